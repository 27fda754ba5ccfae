"""The caption stage as a library: `run_caption_job(CaptionJob)` -> captions written -> a summary.

With `job.shards` unset it writes one JSON line per input item into `job.output`; with it, one
output shard per input shard into `job.shards.output_dir` (see prefixcap.caption.sharded). Errors
are raised, never printed: `prefixcap caption` (caption/cli.py) builds the job from its flags, calls
`run_caption_job` and prints the summary.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import torch

from prefixcap.caption.captioner import Captioner
from prefixcap.caption.inputs import CaptionInputError, CaptionInputs, count_items, iter_items, needs_encoder
from prefixcap.caption.pipeline import Item, PipelineOptions, caption_batches
from prefixcap.caption.sharded import RecaptionSummary, ShardOutputOptions, make_plan, model_fingerprint, run_recaption
from prefixcap.caption.writers import WriterOptions, result_row
from prefixcap.errors import PrefixcapError, UsageError, first_line
from prefixcap.generation import GenerationSettings
from prefixcap.model.quantize import QuantizeError
from prefixcap.retrieval.datastore import DatastoreError

PROG = "prefixcap caption"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class CaptionJob:
    """Everything one `prefixcap caption` run needs, built from its flags."""

    model: str
    inputs: CaptionInputs
    pipeline: PipelineOptions = field(default_factory=PipelineOptions)
    output: str = "-"  # JSON Lines file; "-" is stdout
    device: str | None = None
    dtype: str | None = None  # float32 | float16 | bfloat16; None: as saved
    clip_model: str | None = None  # override the CLIP encoder named in the model's config
    progress: bool = True
    shards: ShardOutputOptions | None = None  # --output_dir: one output shard per input shard
    datastore: str | None = None  # a retrieval model's datastore (None: the one it was trained with)
    quantize: str | None = None  # "int8": the LM's linear layers in int8, CPU only (model/quantize.py)


@dataclass
class CaptionSummary:
    """What a run into one JSON Lines output did."""

    items: int = 0
    captioned: int = 0
    errors: int = 0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.captioned / self.seconds if self.seconds > 0 else 0.0


class ModelLoadError(PrefixcapError, RuntimeError):
    """The model (or its CLIP encoder) does not load; the message names it. A runtime error (exit 1)."""


def load_captioner(job: CaptionJob) -> Captioner:
    """The model, and its CLIP encoder now when any input holds images (a missing one fails the run, not each image)."""
    from transformers.utils import logging as hf_logging

    from prefixcap.devices import resolve_device

    # cuda without CUDA: cpu, with a notice; --quantize is a CPU feature, so it defaults to the CPU
    device = "cpu" if job.quantize and job.device is None else resolve_device(job.device, PROG)
    hf_logging.disable_progress_bar()  # weight-loading bars would drown the captioning bar
    try:
        cap = Captioner.from_pretrained(job.model, device=device, dtype=DTYPES.get(job.dtype),
                                        clip_model=job.clip_model, datastore=job.datastore, quantize=job.quantize)
        if needs_encoder(job.inputs):
            cap.encoder  # noqa: B018
    except (DatastoreError, QuantizeError):  # a bad --datastore, --quantize on a GPU or fp16: exit 2
        raise
    except (OSError, ValueError) as err:  # missing folder, bad config, unloadable LM/CLIP: all named
        raise ModelLoadError(f"cannot load --model {job.model!r}: {first_line(err)}") from err
    return cap


# --------------------------------------------------------------------------- --output: one JSON Lines file
def caption_lines(cap: Captioner, items: Iterable[Item], out: TextIO, options: PipelineOptions,
                  total: int | None = None, show_progress: bool = True) -> CaptionSummary:
    """Caption every item, writing one JSON line per item in input order."""
    from tqdm import tqdm

    n = (options.settings or cap.settings).num_return_sequences
    summary = CaptionSummary()
    start = time.perf_counter()
    bar = tqdm(total=total, unit="img", desc="captioning", disable=not show_progress, dynamic_ncols=True)
    try:
        for results in caption_batches(cap, items, options):
            for result in results:
                out.write(json.dumps(result_row(result, n), ensure_ascii=False) + "\n")
            out.flush()
            summary.items += len(results)
            summary.errors += sum(r.error is not None for r in results)
            bar.update(len(results))
            bar.set_postfix(errors=summary.errors, refresh=False)
    finally:
        bar.close()
    summary.captioned = summary.items - summary.errors
    summary.seconds = time.perf_counter() - start
    return summary


def caption_job(job: CaptionJob, cap: Captioner, total: int | None = None) -> CaptionSummary:
    """Run the job into its --output (one writer per file); `total` sizes the progress bar."""
    from prefixcap.locking import output_lock

    with contextlib.ExitStack() as stack:
        if job.output == "-":
            out: TextIO = sys.stdout
        else:
            Path(job.output).parent.mkdir(parents=True, exist_ok=True)
            # one writer per output file: a second caption run into it is refused, naming the PID
            stack.enter_context(output_lock(job.output, PROG, kind="file", flag="--output"))
            out = stack.enter_context(open(job.output, "w", encoding="utf-8"))
        return caption_lines(cap, iter_items(job.inputs), out, job.pipeline, total=total, show_progress=job.progress)


def _caption_to_output(job: CaptionJob) -> CaptionSummary:
    """--output: check the inputs, load the model, caption into job.output."""
    try:
        total = count_items(job.inputs)  # a folder without images fails before the model loads
    except OSError as err:  # an unreadable input path: as bad an input as a wrong format
        raise CaptionInputError(str(err)) from err
    cap = load_captioner(job)
    try:
        return caption_job(job, cap, total)
    finally:
        cap.close()


# --------------------------------------------------------------------------- --output_dir: shards
def folder_settings(job: CaptionJob) -> dict[str, Any]:
    """What decides the captions of an output folder: a rerun must ask for the same (its caption_settings.json)."""
    settings = job.pipeline.settings or GenerationSettings()
    local = Path(job.model).is_dir()
    return {"model": str(Path(job.model).resolve()) if local else job.model,
            "model_sha256": model_fingerprint(job.model), "clip_model": job.clip_model, "dtype": job.dtype,
            "generation": asdict(settings.normalized()), "generate_kwargs": dict(job.pipeline.generate_kwargs),
            **({"datastore": str(Path(job.datastore).resolve())} if job.datastore else {}),
            # int8 captions differ from fp32 ones: an int8 run never resumes an fp32 folder (nor the reverse)
            **({"quantize": job.quantize} if job.quantize else {})}


class _Loader:
    """Loads the captioner when the run finds work (a finished folder never loads the model)."""

    def __init__(self, job: CaptionJob):
        self.job = job
        self.cap: Captioner | None = None

    def __call__(self) -> Captioner:
        self.cap = load_captioner(self.job)
        return self.cap


def _caption_to_shards(job: CaptionJob) -> RecaptionSummary:
    """--output_dir: this rank's unfinished shards (the model loads only when there is work)."""
    assert job.shards is not None
    settings = job.pipeline.settings or GenerationSettings()
    options = replace(job.pipeline, return_scores=True, encode_ahead=True)  # scores go into every shard
    writer = WriterOptions(job.shards.output_format, settings.num_return_sequences, job.shards.caption_member,
                           job.shards.copy_members, model=job.model, generation=asdict(settings.normalized()))
    loader = _Loader(job)
    try:
        plan = make_plan(job.inputs, job.shards, folder_settings(job))
        other = [s.unit for s in plan.shards if s.unit.input_format != "webdataset"]
        if job.shards.copy_members and other:
            raise UsageError(f"--copy_members needs webdataset (.tar) inputs, but {other[0].name!r} is read as "
                             f"{other[0].input_format}")
        return run_recaption(plan, job.shards, loader, options, writer, job.progress)
    finally:
        if loader.cap is not None:
            loader.cap.close()


# --------------------------------------------------------------------------- the entry
def run_caption_job(job: CaptionJob) -> CaptionSummary | RecaptionSummary:
    """Library entry of `prefixcap caption`: a CaptionSummary for --output, a RecaptionSummary (this rank's
    shards) for --output_dir.

    Raises a UsageError (bad inputs such as CaptionInputError, other settings in the output folder),
    ModelLoadError, OutputLockedError (another run writes the output) or EmbeddingWidthError
    (embeddings the model cannot take); on KeyboardInterrupt finished shards are kept.
    """
    return _caption_to_shards(job) if job.shards is not None else _caption_to_output(job)
