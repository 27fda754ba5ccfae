"""Caption metrics: COCO's (BLEU, METEOR, ROUGE-L, CIDEr-D, SPICE), CLIPScore / RefCLIPScore, diversity.

The COCO metrics run through pycocoevalcap exactly as the COCO caption evaluation server does:
captions are lower-cased and tokenised by the Stanford PTBTokenizer jar that pycocoevalcap ships,
punctuation is removed, and the tokenised text is given to each scorer. Figures are returned on
pycocoevalcap's own scale (BLEU 0..1, CIDEr-D ~0..10); papers print them x100.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np

from prefixcap.errors import PrefixcapError

# Hessel et al. (2021): CLIP-S = w * max(cos(E_image, E_text("A photo depicts " + caption)), 0).
CLIPSCORE_WEIGHT = 2.5
CLIPSCORE_PREFIX = "A photo depicts "

COCO_METRICS = ("bleu", "meteor", "rouge", "cider", "spice")
# The column names pycocoevalcap's COCOEvalCap uses, so JSON files line up with other tools.
METRIC_COLUMNS = {
    "bleu": ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"),
    "meteor": ("METEOR",),
    "rouge": ("ROUGE_L",),
    "cider": ("CIDEr",),
    "spice": ("SPICE",),
}
JAVA_METRICS = ("meteor", "spice")

# Stanford CoreNLP 3.6.0, which SPICE needs next to its jar; pycocoevalcap downloads it on first use.
SPICE_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


class MetricError(PrefixcapError, RuntimeError):
    """A metric could not be computed (missing dependency, failed external tool)."""


def _require_pycocoevalcap() -> None:
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError as err:
        raise MetricError("the COCO caption metrics need pycocoevalcap: pip install 'prefixcap[eval]'") from err


# --------------------------------------------------------------------------------------------
# Java and tokenisation
# --------------------------------------------------------------------------------------------
def java_available() -> bool:
    return shutil.which("java") is not None


@lru_cache(maxsize=1)
def java_version() -> str | None:
    """The `java -version` string (e.g. "17.0.15"), or None without Java."""
    if not java_available():
        return None
    try:
        out = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "([^"]+)"', out.stderr + out.stdout)
    return match.group(1) if match else "unknown"


def _java_major(version: str | None) -> int:
    if not version:
        return 0
    parts = version.split(".")
    try:
        return int(parts[1]) if parts[0] == "1" else int(parts[0])  # "1.8.0_242" -> 8, "17.0.1" -> 17
    except (ValueError, IndexError):
        return 0


def _one_line(text: str) -> str:
    # The tokenizer keeps one caption per line (-preserveLines); any line break inside a caption
    # (\r, \u2028, \x0c, ...) would shift every later caption onto the wrong image.
    return " ".join(text.splitlines()).strip()


def ptb_tokenize(captions: dict[str, list[str]], timeout_s: float = 600) -> dict[str, list[str]]:
    """pycocoevalcap's PTBTokenizer: same jar, flags and punctuation list; key -> tokenised captions.

    Run here rather than through `PTBTokenizer.tokenize` because that writes its temporary file
    into site-packages (fails on read-only installs, races between concurrent runs) and waits on
    Java without a time limit. The output is identical (tests check it).
    """
    _require_pycocoevalcap()
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    if not java_available():
        raise MetricError("the PTB tokenizer needs Java (`java` is not on PATH)")
    owners = [key for key, caps in captions.items() for _ in caps]
    lines = [_one_line(c) for caps in captions.values() for c in caps]
    jar = Path(ptb.__file__).with_name(ptb.STANFORD_CORENLP_3_4_1_JAR)
    with tempfile.TemporaryDirectory(prefix="prefixcap-ptb-") as tmp:
        path = Path(tmp) / "captions.txt"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        cmd = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
               "-lowerCase", "-encoding", "utf-8", str(path)]
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as err:
            raise MetricError(f"the PTB tokenizer did not finish within {timeout_s:.0f} s") from err
    out = proc.stdout.decode("utf-8", errors="replace").split("\n")
    if proc.returncode != 0 or len(out) < len(lines):
        raise MetricError(
            f"the PTB tokenizer failed (exit {proc.returncode}, {len(out)} lines for {len(lines)} captions): "
            f"{proc.stderr.decode(errors='replace')[-500:]}"
        )
    tokenized: dict[str, list[str]] = {key: [] for key in captions}
    for key, line in zip(owners, out):
        tokenized[key].append(" ".join(w for w in line.rstrip().split(" ") if w and w not in ptb.PUNCTUATIONS))
    return tokenized


_SIMPLE_TOKEN = re.compile(r"[^\W_]+(?:'[^\W_]+)?", re.UNICODE)


def simple_tokenize(captions: dict[str, list[str]]) -> dict[str, list[str]]:
    """A Java-free stand-in for the PTB tokenizer: lower-case words, punctuation dropped.

    Close to, but not exactly, PTB tokenisation (contractions differ), so figures computed with it
    are not comparable with published tables; used only when Java is missing.
    """
    return {key: [" ".join(_SIMPLE_TOKEN.findall(c.lower())) for c in caps] for key, caps in captions.items()}


def words(caption: str) -> list[str]:
    """Lower-cased words of a caption (the unit of the diversity statistics)."""
    return _SIMPLE_TOKEN.findall(caption.lower())


# --------------------------------------------------------------------------------------------
# COCO metrics
# --------------------------------------------------------------------------------------------
@dataclass
class CocoScores:
    """Corpus-level figures, per-image figures and how they were computed."""

    corpus: dict[str, float]  # column name (Bleu_4, CIDEr, ...) -> corpus score
    per_image: dict[str, dict[str, float]]  # key -> column name -> score
    tokenizer: str  # "ptb" or "simple"
    notices: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # metric -> why it was skipped


def spice_status() -> tuple[bool, str]:
    """(True, "") when SPICE can run; otherwise (False, a one-line reason). Never downloads."""
    try:
        from pycocoevalcap.spice import spice as spice_module
    except ImportError:
        return False, "SPICE skipped: pycocoevalcap is not installed"
    if not java_available():
        return False, "SPICE skipped: Java is not on PATH"
    lib = Path(spice_module.__file__).parent / "lib"
    missing = [j for j in SPICE_CORENLP_JARS if not (lib / j).is_file()]
    if missing:
        return False, (
            f"SPICE skipped: Stanford CoreNLP 3.6.0 is not installed ({', '.join(missing)} missing in {lib}); "
            "install it once with internet access: python -c \"from pycocoevalcap.spice.get_stanford_models "
            "import get_stanford_models; get_stanford_models()\""
        )
    return True, ""


def _run_spice(tok_preds: dict[str, str], tok_refs: dict[str, list[str]], timeout_s: float
               ) -> tuple[float, dict[str, float]]:
    """SPICE through pycocoevalcap's jar; no LMDB cache (it breaks on Java >= 9) and a time limit."""
    from pycocoevalcap.spice import spice as spice_module

    spice_dir = Path(spice_module.__file__).parent
    keys = list(tok_preds)
    data = [{"image_id": i, "test": tok_preds[k], "refs": tok_refs[k]} for i, k in enumerate(keys)]
    with tempfile.TemporaryDirectory(prefix="prefixcap-spice-") as tmp:
        in_path, out_path = Path(tmp) / "input.json", Path(tmp) / "output.json"
        in_path.write_text(json.dumps(data))
        opens = ["--add-opens", "java.base/java.lang=ALL-UNNAMED"] if _java_major(java_version()) >= 9 else []
        cmd = ["java", *opens, "-jar", "-Xmx8G", spice_module.SPICE_JAR, str(in_path), "-out", str(out_path),
               "-subset", "-silent"]
        try:
            proc = subprocess.run(cmd, cwd=spice_dir, capture_output=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as err:
            raise MetricError(f"SPICE did not finish within {timeout_s:.0f} s") from err
        if proc.returncode != 0 or not out_path.exists():
            tail = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
            raise MetricError(f"SPICE failed (exit {proc.returncode}): {' | '.join(tail)}")
        results = json.loads(out_path.read_text())
    per = {keys[item["image_id"]]: _float_or_nan(item["scores"]["All"]["f"]) for item in results}
    # Like pycocoevalcap: the plain mean, so a NaN (unparsable caption) is visible, not hidden.
    return float(np.mean([per[k] for k in keys])), per


def _float_or_nan(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _scorers() -> dict[str, Callable[[], Any]]:
    """Registry: metric name -> pycocoevalcap scorer factory (SPICE is run separately)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    return {"bleu": lambda: Bleu(4), "meteor": Meteor, "rouge": Rouge, "cider": Cider}


def coco_scores(
    predictions: dict[str, str],
    references: dict[str, list[str]],
    metrics: Iterable[str] = COCO_METRICS,
    tokenizer: str = "auto",
    spice_timeout_s: float = 3600,
) -> CocoScores:
    """Score one prediction per key against that key's references, as the COCO server does.

    tokenizer: "ptb" (needs Java), "simple" (no Java; not comparable with published numbers) or
    "auto" (ptb when Java is present). Without Java, METEOR and SPICE are skipped with a notice.
    """
    _require_pycocoevalcap()
    metrics = list(metrics)
    unknown = [m for m in metrics if m not in METRIC_COLUMNS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; expected some of {', '.join(COCO_METRICS)}")
    keys = list(predictions)
    missing = [k for k in keys if not references.get(k)]
    if missing:
        raise ValueError(f"{len(missing)} prediction(s) have no reference, e.g. {missing[:3]}")
    notices: list[str] = []
    skipped: dict[str, str] = {}
    if tokenizer == "auto":
        tokenizer = "ptb" if java_available() else "simple"
        if tokenizer == "simple":
            notices.append("Java is not on PATH: captions tokenised without the PTB tokenizer, "
                           "so BLEU/ROUGE-L/CIDEr are not comparable with published tables")
    if tokenizer == "ptb":
        tok_refs = ptb_tokenize({k: list(references[k]) for k in keys})
        tok_preds = {k: v[0] for k, v in ptb_tokenize({k: [predictions[k]] for k in keys}).items()}
    elif tokenizer == "simple":
        tok_refs = simple_tokenize({k: list(references[k]) for k in keys})
        tok_preds = {k: v[0] for k, v in simple_tokenize({k: [predictions[k]] for k in keys}).items()}
    else:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; expected auto, ptb or simple")

    corpus: dict[str, float] = {}
    per_image: dict[str, dict[str, float]] = {k: {} for k in keys}
    if not keys:
        return CocoScores(corpus, per_image, tokenizer, notices, skipped)
    gts = {k: tok_refs[k] for k in keys}
    res = {k: [tok_preds[k]] for k in keys}
    factories = _scorers()
    for metric in metrics:
        if metric in JAVA_METRICS and not java_available():
            skipped[metric] = f"{metric.upper()} skipped: Java is not on PATH"
            notices.append(skipped[metric])
            continue
        if metric == "spice":
            ok, reason = spice_status()
            try:
                if not ok:
                    raise MetricError(reason)
                score, per = _run_spice(tok_preds, gts, spice_timeout_s)
            except MetricError as err:
                skipped["spice"] = str(err)
                notices.append(str(err) if str(err).startswith("SPICE") else f"SPICE skipped: {err}")
                continue
            corpus["SPICE"] = score
            for k in keys:
                per_image[k]["SPICE"] = per[k]
            continue
        scorer = factories[metric]()
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # BLEU prints its n-gram statistics
                score, per = scorer.compute_score(gts, res)
        finally:
            _close_java_scorer(scorer)
        columns = METRIC_COLUMNS[metric]
        scores = score if isinstance(score, (list, tuple)) else [score]
        pers = per if metric == "bleu" else [per]
        for col, s, p in zip(columns, scores, pers):
            corpus[col] = float(s)
            for k, v in zip(keys, p):  # pycocoevalcap keeps the order of gts.keys()
                per_image[k][col] = float(v)
    return CocoScores(corpus, per_image, tokenizer, notices, skipped)


def _close_java_scorer(scorer: Any) -> None:
    # METEOR keeps a Java process for its lifetime; stop it now instead of at interpreter exit.
    proc = getattr(scorer, "meteor_p", None)
    if proc is not None and proc.poll() is None:
        with contextlib.suppress(Exception):
            proc.stdin.close()
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------------------------
# CLIPScore / RefCLIPScore
# --------------------------------------------------------------------------------------------
@dataclass
class ClipScores:
    """Per-image CLIP-S and RefCLIP-S (Hessel et al., 2021) and their means."""

    clip_score: np.ndarray  # (N,) w * max(cos(image, text), 0)
    ref_clip_score: np.ndarray | None  # (N,) harmonic mean of CLIP-S and max(max_r cos(c, r), 0)

    def summary(self) -> dict[str, float]:
        out = {"CLIPScore": float(np.mean(self.clip_score)) if len(self.clip_score) else math.nan}
        if self.ref_clip_score is not None:
            out["RefCLIPScore"] = float(np.mean(self.ref_clip_score)) if len(self.ref_clip_score) else math.nan
        return out


def _l2(x):
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def encode_texts(encoder: Any, texts: Sequence[str], prefix: str = CLIPSCORE_PREFIX, batch_size: int = 64,
                 progress: bool = False, desc: str = "CLIP text"):
    """(N, C) L2-normalised CLIP text embeddings of prefix + text (the prefix Hessel et al. use)."""
    import torch
    from tqdm.auto import tqdm

    chunks = []
    with tqdm(total=len(texts), desc=desc, unit="text", disable=not progress) as bar:
        for start in range(0, len(texts), batch_size):
            batch = [prefix + t for t in texts[start:start + batch_size]]
            chunks.append(_l2(encoder.encode_text(batch).float().cpu()))  # (b, C)
            bar.update(len(batch))
    if not chunks:
        return torch.zeros(0, encoder.embedding_dim)
    return torch.cat(chunks)  # (N, C)


def encode_images(encoder: Any, images: Sequence[Any], batch_size: int = 32, progress: bool = False):
    """(N, C) L2-normalised CLIP image embeddings and an (N,) bool mask of images that could be read.

    images: file paths, encoded bytes or PIL images, decoded by the shared decoder (pixel limit, EXIF
    orientation, bit depth). An unreadable one gives a zero row and False in the mask.
    """
    import torch
    from tqdm.auto import tqdm

    from prefixcap.data.images import ImageInputError, load_image

    preprocess = encoder.preprocessor()  # crops extreme aspect ratios before resizing
    feats = torch.zeros(len(images), encoder.embedding_dim)
    ok = np.zeros(len(images), dtype=bool)
    with tqdm(total=len(images), desc="CLIP images", unit="img", disable=not progress) as bar:
        for start in range(0, len(images), batch_size):
            pixels, rows = [], []
            for i in range(start, min(start + batch_size, len(images))):
                try:
                    pixels.append(preprocess(load_image(images[i])))  # (3, H, W)
                    rows.append(i)
                except (ImageInputError, OSError, ValueError):  # unreadable, or the processor refuses it
                    pass  # counted through the mask
            if rows:
                batch = torch.from_numpy(np.stack(pixels))  # (b, 3, H, W)
                feats[rows] = _l2(encoder.encode_pixels(batch).float().cpu())  # (b, C)
                ok[rows] = True
            bar.update(min(batch_size, len(images) - start))
    return feats, ok


def clip_scores(encoder: Any, image_features, candidates: Sequence[str],
                references: Sequence[Sequence[str]] | None = None, weight: float = CLIPSCORE_WEIGHT,
                prefix: str = CLIPSCORE_PREFIX, batch_size: int = 64, progress: bool = False) -> ClipScores:
    """CLIP-S and (with references) RefCLIP-S per image, exactly as Hessel et al. (2021) define them.

    image_features: (N, C) CLIP image embeddings (any scale; normalised here), row i for candidate i.
    CLIP-S_i = weight * max(cos(image_i, text(prefix + candidate_i)), 0).
    RefCLIP-S_i = harmonic mean of CLIP-S_i and max(max_r cos(text(candidate_i), text(r)), 0), the
    references r encoded with the same prefix, as the authors' code does.
    """
    import torch

    image_features = _l2(torch.as_tensor(np.asarray(image_features), dtype=torch.float32))  # (N, C)
    if image_features.shape[0] != len(candidates):
        raise ValueError(f"{image_features.shape[0]} image embeddings for {len(candidates)} captions")
    cand = encode_texts(encoder, list(candidates), prefix, batch_size, progress, "CLIP captions")  # (N, C)
    clip_s = weight * (image_features * cand).sum(-1).clamp_min(0)  # (N,)
    ref_s = None
    if references is not None:
        if len(references) != len(candidates):
            raise ValueError(f"{len(references)} reference lists for {len(candidates)} captions")
        empty = [i for i, r in enumerate(references) if not r]
        if empty:
            raise ValueError(f"RefCLIPScore needs at least one reference per caption; caption {empty[0]} has none")
        flat = [r for refs in references for r in refs]
        owner = torch.tensor([i for i, refs in enumerate(references) for _ in refs])  # (R,)
        ref_feats = encode_texts(encoder, flat, prefix, batch_size, progress, "CLIP references")  # (R, C)
        sims = (cand[owner] * ref_feats).sum(-1)  # (R,)
        best = torch.full((len(candidates),), -math.inf).scatter_reduce(0, owner, sims, "amax")  # (N,)
        best = best.clamp_min(0)
        denom = clip_s + best
        ref_s = torch.where(denom > 0, 2 * clip_s * best / denom.clamp_min(1e-12), torch.zeros_like(denom))
        ref_s = ref_s.numpy().astype(np.float64)
    return ClipScores(clip_s.numpy().astype(np.float64), ref_s)


# --------------------------------------------------------------------------------------------
# Diversity
# --------------------------------------------------------------------------------------------
def diversity_stats(captions: Sequence[str]) -> dict[str, float]:
    """Mean length in words, vocabulary size and the share of distinct captions.

    A model that says the same sentence for every image has a distinct share near 1/N.
    """
    tokenized = [words(c) for c in captions]
    n = len(tokenized)
    distinct = len({" ".join(t) for t in tokenized})
    return {
        "mean_length_words": float(np.mean([len(t) for t in tokenized])) if n else 0.0,
        "vocabulary_size": len({w for t in tokenized for w in t}),
        "distinct_captions": distinct,
        "distinct_caption_share": distinct / n if n else 0.0,
    }
