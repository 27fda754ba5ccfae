"""Safe image and caption decoding: bad inputs become a skip reason or a counted conversion, never a crash."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

from prefixcap.encoders import to_rgb

# PIL's own default limit (about 89 Mpx, a 9459x9459 image): a larger image is treated as a
# decompression bomb and skipped instead of being allowed to exhaust a worker's memory.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

# Skip reasons (an image or a caption is left out) and conversions (kept after a fix), by name.
SKIP_REASONS = {
    "empty_file": "zero-byte image",
    "not_an_image": "bytes that no image decoder recognises",
    "truncated": "image data ends early",
    "corrupt": "image data that fails to decode",
    "too_large": "more pixels than --max_image_pixels (decompression bomb)",
    "missing_image": "no image for the key (missing file, column value or tar member)",
    "unreadable_image": "image file that cannot be read (permissions, I/O error)",
    "no_caption": "image without any non-empty caption",
    "empty_caption": "empty or whitespace-only caption (the image is kept if it has another)",
    "truncated_tar": "tar file that ends early or cannot be read (the samples before it are kept)",
    "worker_error": "unexpected error while decoding (see the log)",
}
CONVERSIONS = {
    "cmyk": "CMYK image converted to RGB",
    "palette": "palette image converted to RGB",
    "grayscale": "grayscale / 16-bit image converted to RGB",
    "alpha": "image with transparency composited on white",
    "animated": "animated image: first frame used",
    "non_utf8_caption": "caption bytes not valid UTF-8: decoded with replacement characters",
}


@dataclass
class Decoded:
    """An RGB image, or why there is none, plus the conversions applied."""

    image: Image.Image | None
    reason: str | None = None
    conversions: list[str] = field(default_factory=list)


def _mode_conversion(image: Image.Image) -> str | None:
    mode = image.mode
    if mode == "CMYK":
        return "cmyk"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        return "alpha"
    if mode in ("P",):
        return "palette"
    if mode in ("1", "L", "I", "F") or mode.startswith("I;"):
        return "grayscale"
    return None


def decode_image(data: bytes | None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 draft_size: int | None = None) -> Decoded:
    """bytes -> RGB PIL image (fully loaded) or a skip reason from SKIP_REASONS.

    draft_size lets the JPEG decoder scale down by 2/4/8 while decoding (much faster) as long as
    both sides stay >= draft_size; it changes pixels slightly, so it is opt-in.
    """
    if data is None:
        return Decoded(None, "missing_image")
    if len(data) == 0:
        return Decoded(None, "empty_file")
    try:
        with warnings.catch_warnings():
            # PIL only warns between max_pixels and 2*max_pixels; make that a skip as well.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            previous = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = max_pixels
            try:
                image = Image.open(io.BytesIO(data))
                width, height = image.size
                if width * height > max_pixels:  # checked before any pixel is decoded
                    return Decoded(None, "too_large")
                conversions = []
                if getattr(image, "is_animated", False):
                    conversions.append("animated")
                    image.seek(0)
                if draft_size and image.format == "JPEG":
                    image.draft("RGB", (draft_size, draft_size))
                image.load()
            finally:
                Image.MAX_IMAGE_PIXELS = previous
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return Decoded(None, "too_large")
    except UnidentifiedImageError:
        return Decoded(None, "not_an_image")
    except OSError as err:
        return Decoded(None, "truncated" if "truncated" in str(err).lower() else "corrupt")
    except (ValueError, SyntaxError, EOFError, IndexError, TypeError, ZeroDivisionError, MemoryError):
        return Decoded(None, "corrupt")
    mode_change = _mode_conversion(image)
    if mode_change:
        conversions.append(mode_change)
    try:
        rgb = to_rgb(image)
        rgb.load()
    except (OSError, ValueError) as err:
        return Decoded(None, "truncated" if "truncated" in str(err).lower() else "corrupt")
    return Decoded(rgb, None, conversions)


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
