"""Caption decoding and the reason / conversion tables (image decoding is tested in test_images.py)."""

from __future__ import annotations

import pytest

from prefixcap.data.decode import CONVERSIONS, SKIP_REASONS, decode_caption
from prefixcap.data.images import IMAGE_CONVERSIONS, IMAGE_SKIP_REASONS


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


def test_tables_hold_every_image_reason_and_the_caption_ones():
    assert IMAGE_SKIP_REASONS.items() <= SKIP_REASONS.items()
    assert IMAGE_CONVERSIONS.items() <= CONVERSIONS.items()
    assert {"no_caption", "empty_caption", "truncated_tar", "worker_error"} <= set(SKIP_REASONS)
    assert "non_utf8_caption" in CONVERSIONS
