"""Build a datastore: captions from any input -> CLIP text embeddings in batches -> a FAISS index, atomically.

The build works in `{output_dir}/.partial/`: the captions are written first, then the embeddings
fill a memory-mapped float32 file batch by batch with the number of finished rows recorded after
each batch (so an interrupted build resumes where it stopped), then the index is built and every
file is renamed into the datastore, the manifest last. Appending to an existing datastore
(`append=True`) adds rows to its embeddings; a datastore never mixes CLIP models.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from prefixcap.data.records import ReaderConfig, ReaderOptions
from prefixcap.retrieval.datastore import (CAPTIONS, EMBEDDINGS, INDEX, INDEX_TYPES, MANIFEST, DatastoreError,
                                           DatastoreManifest)
from prefixcap.runs import atomic_write_json

PARTIAL = ".partial"
PROGRESS = "progress.json"


class BuildInterrupted(DatastoreError):
    """The build stopped at a safe point on request; rerunning the same command resumes it."""


@dataclass
class DatastoreConfig:
    """What `prefixcap datastore build` builds."""

    inputs: list[str]
    output_dir: str
    input_format: str = "files"
    options: ReaderOptions = field(default_factory=ReaderOptions)
    clip_model: str = "ViT-B/32"
    index_type: str = "flat"  # flat: exact inner product; ivf / hnsw: approximate, for millions of captions
    batch_size: int = 256
    device: str = "cpu"
    append: bool = False  # add to an existing datastore instead of replacing it
    progress: bool = True


@dataclass
class DatastoreSummary:
    """What a build wrote."""

    output_dir: str
    count: int
    added: int
    embedding_dim: int
    index_type: str
    seconds: float
    captions_per_second: float
    resumed_from: int = 0


def read_captions(cfg: DatastoreConfig) -> Iterator[tuple[str, str]]:
    """(key, caption) of every caption of the inputs (no image is read); an image's captions share its key,
    which is how training leaves an image's own captions out of its prompt."""
    from prefixcap.data.decode import decode_caption
    from prefixcap.data.text_only import make_caption_reader

    reader = make_caption_reader(ReaderConfig(inputs=list(cfg.inputs), input_format=cfg.input_format,
                                              options=cfg.options))
    for unit in range(len(reader.units())):
        for record in reader.records(unit):
            for raw in record.captions:
                text, _ = decode_caption(raw)
                if text:
                    yield str(record.key), text


def _settings(cfg: DatastoreConfig) -> dict:
    return {"inputs": list(cfg.inputs), "input_format": cfg.input_format, "clip_model": cfg.clip_model,
            "append": cfg.append}


def _start_partial(cfg: DatastoreConfig, out: Path, partial: Path) -> int:
    """Reuse a matching unfinished build (returns its finished rows) or start one (writes the captions)."""
    settings = _settings(cfg)
    progress = partial / PROGRESS
    if progress.is_file() and json.loads(progress.read_text()).get("settings") == settings:
        return int(json.loads(progress.read_text())["done"])
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        count = _write_captions(read_captions(cfg), partial / CAPTIONS)
    except BaseException:  # an unreadable input: nothing half-read is left behind
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if not count:
        shutil.rmtree(partial, ignore_errors=True)
        raise DatastoreError(f"--input_dataset {' '.join(cfg.inputs)}: no captions found ({cfg.input_format} "
                             "input); a datastore needs at least one")
    atomic_write_json(progress, {"settings": settings, "done": 0, "count": count})
    return 0


def _write_captions(rows: Iterator[tuple[str, str]], path: Path, chunk: int = 65536) -> int:
    """Stream (key, caption) rows into an Arrow file in record batches (never all in memory); returns the count."""
    schema = pa.schema([("key", pa.string()), ("caption", pa.string())])
    tmp, count = path.with_name(f".{path.name}.tmp"), 0
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        batch: list[tuple[str, str]] = []
        for row in rows:
            batch.append(row)
            if len(batch) == chunk:
                writer.write_batch(pa.record_batch([[k for k, _ in batch], [c for _, c in batch]], schema=schema))
                count, batch = count + len(batch), []
        if batch:
            writer.write_batch(pa.record_batch([[k for k, _ in batch], [c for _, c in batch]], schema=schema))
            count += len(batch)
    tmp.replace(path)
    return count


def _embed(cfg: DatastoreConfig, partial: Path, done: int, should_stop: Callable[[], bool] | None) -> int:
    """Fill the memory-mapped embeddings from row `done` on; returns the embedding width."""
    import torch
    from tqdm import tqdm

    from prefixcap.model.encoders import load_encoder, normalize

    captions = pa.ipc.open_file(pa.memory_map(str(partial / CAPTIONS))).read_all().column("caption")
    n = len(captions)
    encoder = load_encoder(cfg.clip_model, device=cfg.device)
    dim = int(encoder.embedding_dim)
    mode = "r+" if (partial / EMBEDDINGS).is_file() else "w+"
    emb = np.memmap(partial / EMBEDDINGS, np.float32, mode=mode, shape=(n, dim))  # (N, C)
    bar = tqdm(total=n, initial=done, unit="caption", desc="datastore", disable=not cfg.progress, dynamic_ncols=True)
    for start in range(done, n, cfg.batch_size):
        texts = captions.slice(start, cfg.batch_size).to_pylist()
        with torch.inference_mode():
            emb[start:start + len(texts)] = normalize(encoder.encode_text(texts).float()).cpu().numpy()  # (b, C)
        emb.flush()
        progress = json.loads((partial / PROGRESS).read_text())
        atomic_write_json(partial / PROGRESS, {**progress, "done": start + len(texts), "dim": dim})
        bar.update(len(texts))
        if should_stop is not None and should_stop() and start + len(texts) < n:  # the safe point
            bar.close()
            raise BuildInterrupted(f"stopped after {start + len(texts)} of {n} captions; rerun the same command "
                                   "to resume")
    bar.close()
    return dim


def _build_index(vectors: np.ndarray, index_type: str, chunk: int = 65536):
    """FAISS index over unit-norm (N, C) vectors; inner product = cosine similarity."""
    import faiss

    n, dim = vectors.shape
    if index_type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    else:  # ivf: ~4 sqrt(N) lists, trained on a sample, searched in 1/8 of them (at least 8)
        nlist = max(1, min(int(4 * n ** 0.5), n // 39 or 1))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).choice(n, min(n, 256 * nlist), replace=False)
        index.train(np.ascontiguousarray(vectors[np.sort(sample)]))
        index.nprobe = max(8, nlist // 8)
    for start in range(0, n, chunk):  # from the memory map a chunk at a time
        index.add(np.ascontiguousarray(vectors[start:start + chunk]))
    return index


def _merge_existing(out: Path, partial: Path) -> tuple[Path, Path]:
    """append: (captions, embeddings) files holding the old rows then the new ones; the partial build's own
    files stay as they are, so an interruption here resumes cleanly."""
    def rows() -> Iterator[tuple[str, str]]:  # both memory-mapped, streamed into the merged file
        for source in (out / CAPTIONS, partial / CAPTIONS):
            table = pa.ipc.open_file(pa.memory_map(str(source))).read_all()
            for batch in table.to_batches(65536):
                yield from zip(batch.column(0).to_pylist(), batch.column(1).to_pylist())

    _write_captions(rows(), partial / f"merged.{CAPTIONS}")
    merged = partial / f"merged.{EMBEDDINGS}"
    with open(merged, "wb") as f:
        for source in (out / EMBEDDINGS, partial / EMBEDDINGS):
            with open(source, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 24)  # streamed, never all in memory
    return partial / f"merged.{CAPTIONS}", merged


def _check_same_clip(cfg: DatastoreConfig, old: DatastoreManifest | None, dim: int | None) -> None:
    if old is None or (old.clip_model == cfg.clip_model and dim in (None, old.embedding_dim)):
        return
    width = f" ({dim}-d)" if dim is not None else ""
    raise DatastoreError(f"{cfg.output_dir} holds a datastore of CLIP model {old.clip_model!r} ({old.embedding_dim}-d); "
                         f"refusing to {'add to it' if cfg.append else 'rebuild it'} with --clip_model "
                         f"{cfg.clip_model!r}{width}: a datastore never mixes CLIP models (use another --output_dir)")


def build_datastore(cfg: DatastoreConfig, should_stop: Callable[[], bool] | None = None) -> DatastoreSummary:
    """Build (or append to) the datastore at cfg.output_dir; `should_stop` is polled after every batch."""
    import faiss

    if cfg.index_type not in INDEX_TYPES:
        raise DatastoreError(f"--index_type {cfg.index_type!r}: expected one of {', '.join(INDEX_TYPES)}")
    if cfg.batch_size < 1:
        raise DatastoreError(f"--batch_size must be at least 1, got {cfg.batch_size}")
    if Path(cfg.clip_model).is_dir():  # a local CLIP folder is recorded (and compared) by its absolute path
        cfg = replace(cfg, clip_model=str(Path(cfg.clip_model).resolve()))
    out, start_time = Path(cfg.output_dir), time.perf_counter()
    old = DatastoreManifest.read(out) if (out / MANIFEST).is_file() else None
    if cfg.append and old is None:
        raise DatastoreError(f"--append: {out} holds no datastore to append to")
    _check_same_clip(cfg, old, None)  # refused before any work
    partial = out / PARTIAL
    done = _start_partial(cfg, out, partial)
    dim = _embed(cfg, partial, done, should_stop)
    _check_same_clip(cfg, old, dim)
    added = int(json.loads((partial / PROGRESS).read_text())["count"])
    captions, embeddings = _merge_existing(out, partial) if cfg.append else (partial / CAPTIONS, partial / EMBEDDINGS)
    count = added + (old.count if cfg.append else 0)
    vectors = np.memmap(embeddings, np.float32, mode="r", shape=(count, dim))  # (N, C)
    faiss.write_index(_build_index(vectors, cfg.index_type), str(partial / INDEX))
    del vectors
    (out / MANIFEST).unlink(missing_ok=True)  # incomplete while the files are swapped
    for source, name in ((captions, CAPTIONS), (embeddings, EMBEDDINGS), (partial / INDEX, INDEX)):
        source.replace(out / name)
    inputs = (old.inputs if cfg.append else []) + list(cfg.inputs)
    manifest = DatastoreManifest(clip_model=cfg.clip_model, embedding_dim=dim, count=count,
                                 index_type=cfg.index_type, inputs=inputs, input_format=cfg.input_format,
                                 created_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    atomic_write_json(out / MANIFEST, asdict(manifest))
    shutil.rmtree(partial, ignore_errors=True)
    seconds = time.perf_counter() - start_time
    return DatastoreSummary(output_dir=str(out), count=count, added=added, embedding_dim=dim,
                            index_type=cfg.index_type, seconds=round(seconds, 2),
                            captions_per_second=round((added - done) / max(seconds, 1e-9), 1), resumed_from=done)
