"""Every EXIF orientation (2-8) is put upright exactly as PIL's ImageOps.exif_transpose does (issue 24)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from prefixcap.data.images import decode_image, load_image
from prep_helpers import rgb_array


def _with_orientation(orientation: int, fmt: str) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(rgb_array(orientation, size=(24, 16))).save(buf, fmt, exif=exif)  # not square: rotations show
    return buf.getvalue()


@pytest.mark.parametrize("orientation", range(2, 9))
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_each_orientation_matches_exif_transpose(orientation, fmt):
    data = _with_orientation(orientation, fmt)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    out = decode_image(data)
    assert out.conversions == ["exif_orientation"]
    assert np.array_equal(np.asarray(out.image), expected)
    assert np.array_equal(np.asarray(load_image(Image.open(io.BytesIO(data)))), expected)


def test_orientation_1_is_left_as_stored():
    data = _with_orientation(1, "PNG")
    out = decode_image(data)
    assert out.conversions == [] and np.array_equal(np.asarray(out.image), np.asarray(Image.open(io.BytesIO(data))))
