"""Image and caption decoding: every awkward input becomes a skip reason or a counted conversion."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from prefixcap.data.decode import CONVERSIONS, SKIP_REASONS, decode_caption, decode_image
from prep_helpers import awkward_images, bomb_png, image_bytes, rgb_array

CASES = awkward_images()


@pytest.mark.parametrize("name", sorted(CASES))
def test_awkward_images(name):
    data, reason, conversion = CASES[name]
    out = decode_image(data, max_pixels=1_000_000)
    assert out.reason == reason
    if reason is None:
        assert out.image is not None and out.image.mode == "RGB"
        assert out.image.size[0] > 0
    else:
        assert out.image is None and reason in SKIP_REASONS
    if conversion:
        assert conversion in out.conversions and conversion in CONVERSIONS
    else:
        assert out.conversions == []


def test_missing_and_corrupt():
    assert decode_image(None).reason == "missing_image"
    from prep_helpers import corrupt_jpeg

    assert decode_image(corrupt_jpeg()).reason in {"corrupt", "truncated"}


def test_good_image_pixels_are_kept():
    out = decode_image(image_bytes(3, "PNG"))
    assert np.array_equal(np.asarray(out.image), rgb_array(3))


def test_alpha_is_composited_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black
    import io

    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    out = decode_image(buf.getvalue())
    assert np.all(np.asarray(out.image) == 255)


def test_decompression_bomb_with_default_limit():
    # 10000 x 10000 = 100 Mpx > PIL's default 89 Mpx; the file itself is small.
    data = bomb_png(10000, 10000)
    assert len(data) < 200_000
    assert decode_image(data).reason == "too_large"


def test_jpeg_draft_keeps_size_above_target():
    data = image_bytes(0, size=(640, 480))
    out = decode_image(data, draft_size=224)
    assert min(out.image.size) >= 224 and out.image.size[0] < 640


@pytest.mark.parametrize("raw,expected", [
    ("a cat", ("a cat", None)),
    ("  a\ncat \t on a mat ", ("a cat on a mat", None)),
    (b"caf\xc3\xa9", ("café", None)),
    (b"caf\xe9 au lait", ("caf\ufffd au lait", "non_utf8_caption")),
    ("", (None, "empty_caption")),
    ("   \n", (None, "empty_caption")),
    (None, (None, "empty_caption")),
])
def test_decode_caption(raw, expected):
    assert decode_caption(raw) == expected
