"""Caption decoding, and the names of every skip reason and conversion the preprocess stage counts.

Images are decoded in `prefixcap.data.images`; its reasons and conversions are part of these tables.
"""

from __future__ import annotations

from prefixcap.data.images import IMAGE_CONVERSIONS, IMAGE_SKIP_REASONS

# Skip reasons (an image or a caption is left out) and conversions (kept after a fix), by name.
SKIP_REASONS = {
    **IMAGE_SKIP_REASONS,
    "no_caption": "image without any non-empty caption",
    "empty_caption": "empty or whitespace-only caption (the image is kept if it has another)",
    "truncated_tar": "tar file that ends early or cannot be read (the samples before it are kept)",
    "duplicate_member": "a tar member name repeated within a sample (the first is kept)",
    "duplicate_key": "a sample key seen before in this run's input (the first sample is kept)",
    "worker_error": "unexpected error while decoding (see the log)",
}
# Skipped records that stand for a tar member or a whole tar, not a sample: they count towards no
# sample total (preprocess progress) and get no output row (re-captioning writers).
NOT_SAMPLE_REASONS = ("duplicate_member", "truncated_tar")
CONVERSIONS = {
    **IMAGE_CONVERSIONS,
    "non_utf8_caption": "caption bytes not valid UTF-8: decoded with replacement characters",
    "clip_text_truncated": ("caption longer than the CLIP text encoder's context (--text_only): its embedding "
                            "encodes the first context-length tokens, as CLIP's own tokenizer cuts it"),
}


def decode_caption(raw: str | bytes | None) -> tuple[str | None, str | None]:
    """Caption bytes/str -> (clean text or None, skip reason or conversion name or None).

    Returns (text, None) for a clean caption, (text, "non_utf8_caption") for a converted one and
    (None, "empty_caption") when nothing is left.
    """
    note = None
    if raw is None:
        return None, "empty_caption"
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = bytes(raw)
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raw = raw.decode("utf-8", errors="replace")
            note = "non_utf8_caption"
    if not isinstance(raw, str):
        raw = str(raw)
    text = " ".join(raw.split())  # collapse newlines/tabs: a caption is one line of text
    if not text:
        return None, "empty_caption"
    return text, note
