"""The one image decoder: any image input -> an upright RGB PIL image, or a named reason why not.

Every stage (preprocess workers, `Captioner`, CLIPScore, the HTTP service) decodes through this
module, so all of them apply the same limits and fixes:
- the pixel limit is checked from the header, before any pixel is decoded, per call and without
  touching PIL's process-global `Image.MAX_IMAGE_PIXELS` (so any number of threads may decode at
  once with different limits);
- EXIF orientation is applied (`ImageOps.exif_transpose`), so a phone photo is embedded upright;
- 16-bit and float images are scaled by their bit depth, not by their own maximum;
- palette, transparency (composited on white), CMYK, grayscale and animated images become RGB,
  each fix counted by name;
- `bound_aspect` crops an extreme aspect ratio before an encoder's shortest-edge resize, which
  would otherwise allocate (short side -> S) x (long side * S / short side) pixels: 1.2 GB for a
  1x30000 PNG of 100 bytes at 64 px, 15 GB at 224 px.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from prefixcap.errors import PrefixcapError

# File name endings read as images wherever a folder is listed (preprocess, caption).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# PIL's own default limit (about 89 Mpx, a 9459x9459 image): a larger image is treated as a
# decompression bomb and skipped instead of being allowed to exhaust a worker's memory.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

# Longest side / shortest side kept in front of an encoder's shortest-edge resize + centre crop.
# That crop keeps only the central square, so cutting an image to its central 16:1 region changes
# nothing it keeps (up to resampling round-off) while bounding the resize to S x 16 S pixels
# (about 10 MB of float32 at 224 px). Images up to 16:1 (any real panorama) are not touched.
MAX_ASPECT_RATIO = 16

# Why an image is skipped, and what was fixed in a kept one (by name: counted in manifests).
IMAGE_SKIP_REASONS = {
    "empty_file": "zero-byte image",
    "not_an_image": "bytes that no image decoder recognises",
    "truncated": "image data ends early",
    "corrupt": "image data that fails to decode",
    "too_large": "more pixels than --max_image_pixels (decompression bomb)",
    "missing_image": "no image for the key (missing file, column value or tar member)",
    "unreadable_image": "image file that cannot be read (permissions, I/O error)",
}
IMAGE_CONVERSIONS = {
    "cmyk": "CMYK image converted to RGB",
    "palette": "palette image converted to RGB",
    "grayscale": "grayscale / 16-bit image converted to RGB",
    "alpha": "image with transparency composited on white",
    "animated": "animated image: first frame used",
    "exif_orientation": "EXIF orientation applied (image rotated / flipped upright)",
}

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_EXIF_ORIENTATION = 0x0112


class ImageInputError(PrefixcapError, ValueError):
    """An input that cannot be read or decoded into an RGB image; the message starts with the reason."""


@dataclass
class Decoded:
    """An RGB image, or why there is none, plus the conversions applied."""

    image: Image.Image | None
    reason: str | None = None
    conversions: list[str] = field(default_factory=list)
    size: tuple[int, int] | None = None  # (width, height) from the header, when it was read
    detail: str = ""  # the decoder's own words on a failure, for messages


def decode_image(data: bytes | None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, draft_size: int | None = None,
                 formats: tuple[str, ...] | None = None) -> Decoded:
    """Encoded bytes -> upright RGB PIL image (fully loaded), or a reason from IMAGE_SKIP_REASONS.

    Thread-safe: all state is local. draft_size lets the JPEG decoder scale down by 2/4/8 while
    decoding (much faster) as long as both sides stay >= draft_size; it changes pixels slightly,
    so it is opt-in. formats restricts which PIL decoders may open the data (None: all).
    """
    if data is None:
        return Decoded(None, "missing_image")
    if len(data) == 0:
        return Decoded(None, "empty_file")
    conversions: list[str] = []
    size = None
    try:
        # PIL's own bomb check reads the global Image.MAX_IMAGE_PIXELS inside Image.open (and in
        # some plugins, per frame or tile). We never change that global per call (another thread
        # could be decoding); our per-call limit is checked right below from the header, before
        # any pixel is decoded. PIL's check stays a second line of defence: its error (above twice
        # its limit) is a "too_large" skip as well, and its warning between 1x and 2x is left to the
        # caller's warning filters. A stage whose limit exceeds PIL's raises PIL's once at start-up
        # (`raise_pil_limit`).
        image = Image.open(io.BytesIO(data), formats=list(formats) if formats else None)
        size = image.size
        if size[0] * size[1] > max_pixels:
            return Decoded(None, "too_large", size=size,
                           detail=f"{size[0]}x{size[1]} = {size[0] * size[1]} pixels is more than the limit "
                                  f"of {max_pixels}")
        if getattr(image, "is_animated", False):
            conversions.append("animated")
            image.seek(0)
        if draft_size and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        image.load()
        rgb, fixes = prepare(image)
        conversions.extend(fixes)
        rgb.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return Decoded(None, "too_large", size=size, detail=str(err))
    except UnidentifiedImageError as err:
        return Decoded(None, "not_an_image", size=size, detail=str(err))
    except OSError as err:
        reason = "truncated" if "truncated" in str(err).lower() else "corrupt"
        return Decoded(None, reason, size=size, detail=str(err))
    except Exception as err:  # noqa: BLE001 - PIL plugins raise many types (SyntaxError, struct.error...)
        return Decoded(None, "corrupt", size=size, detail=f"{type(err).__name__}: {err}")
    return Decoded(rgb, None, conversions, size=size)


def prepare(image: Image.Image) -> tuple[Image.Image, list[str]]:
    """A decoded PIL image -> (upright RGB image, names of the conversions applied)."""
    conversions = []
    mode_change = _mode_conversion(image)
    if mode_change:
        conversions.append(mode_change)
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF: the pixels are still good, keep them as stored
        orientation = 1
    if orientation in range(2, 9):  # 1 is upright; exif_transpose would copy the image for nothing
        image = ImageOps.exif_transpose(image)
        conversions.append("exif_orientation")
    return to_rgb(image), conversions


def _mode_conversion(image: Image.Image) -> str | None:
    mode = image.mode
    if mode == "CMYK":
        return "cmyk"
    if mode in _SIXTEEN_BIT_MODES or mode == "F":  # to_rgb scales these; a tRNS value is not applied
        return "grayscale"
    if mode in _ALPHA_MODES or "transparency" in image.info:
        return "alpha"
    if mode == "P":
        return "palette"
    if mode in ("1", "L"):
        return "grayscale"
    return None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (CMYK, P, LA, RGBA, I;16, F, animated first frame) to RGB, alpha on white.

    16-bit modes (I;16*, and I, which PIL uses for 16-bit PPM/PGM) are scaled by their bit depth:
    v / 257, so a 16-bit copy of an 8-bit picture gives back exactly its pixels; values outside
    0..65535 are clipped. F (float) images are taken to hold 0..1 (clipped), the convention of
    float image arrays. Neither is stretched by its own maximum, which would brighten dark images.
    """
    if getattr(image, "is_animated", False):
        image.seek(0)
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _SIXTEEN_BIT_MODES or mode == "F":
        arr = np.asarray(image)  # (H, W) uint16 / int32 / float32
        scaled = (np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0 if mode == "F"
                  else np.clip(arr, 0, 65535).astype(np.float32) / 257.0)
        return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def bound_aspect(image: Image.Image, max_aspect: int = MAX_ASPECT_RATIO) -> Image.Image:
    """Crop to the central region whose long side is at most max_aspect x the short side.

    Meant for right before an encoder's shortest-edge resize + centre crop (see MAX_ASPECT_RATIO):
    the region kept is centred exactly as the centre crop is (same parity of the cut), so that crop
    sees the same central pixels. Images within the bound are returned as they are.
    """
    width, height = image.size
    short, long = min(width, height), max(width, height)
    keep = max(1, short) * max_aspect
    if long <= keep:
        return image
    keep += (long - keep) % 2  # an even cut on each side: the centre stays where it was
    start = (long - keep) // 2
    box = (start, 0, start + keep, height) if width > height else (0, start, width, start + keep)
    return image.crop(box)


def raise_pil_limit(max_pixels: int) -> None:
    """Once at start-up, never per call: let PIL's own bomb check allow max_pixels (never lowers it)."""
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and max_pixels > current:
        Image.MAX_IMAGE_PIXELS = max_pixels


def read_bytes(source: Any) -> bytes:
    """A path, bytes or binary file object -> the encoded image bytes (ImageInputError if unreadable)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        try:
            return Path(source).read_bytes()
        except FileNotFoundError:
            raise ImageInputError(f"missing_image: image file not found: {os.fspath(source)}") from None
        except OSError as err:
            raise ImageInputError(f"unreadable_image: cannot read {os.fspath(source)}: {err}") from err
    if hasattr(source, "read"):
        return source.read()
    raise ImageInputError(f"unsupported image input of type {type(source).__name__}; expected a path, "
                          "bytes, a PIL image, a uint8 array or a float (3, H, W) pixel tensor")


def load_image(source: Any, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """A path, bytes, file object, PIL image or uint8 array -> upright RGB PIL image, or ImageInputError."""
    if isinstance(source, np.ndarray):
        return to_rgb(uint8_to_pil(source))
    if isinstance(source, Image.Image):  # already in memory: no pixel limit to apply
        return prepare(source)[0]
    decoded = decode_image(read_bytes(source), max_pixels)
    if decoded.image is None:
        raise ImageInputError(f"{decoded.reason}: {IMAGE_SKIP_REASONS[decoded.reason]}")
    return decoded.image


def uint8_to_pil(arr: np.ndarray) -> Image.Image:
    """A uint8 (H, W), (H, W, C) or (C, H, W) array -> PIL image."""
    if arr.dtype != np.uint8:
        raise ImageInputError(f"an image array must be uint8, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)  # (C, H, W) torch layout -> (H, W, C)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise ImageInputError(f"a uint8 image array must be (H, W), (H, W, C) or (C, H, W), got {arr.shape}")
    return Image.fromarray(np.ascontiguousarray(arr))
