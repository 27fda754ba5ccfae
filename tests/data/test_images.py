"""The shared image decoder: awkward inputs, EXIF, bit depth, thread safety, and thin images in every stage."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prefixcap.data.decode import CONVERSIONS, SKIP_REASONS
from prefixcap.data.images import (
    MAX_ASPECT_RATIO, ImageInputError, bound_aspect, decode_image, load_image, to_rgb,
)
from prep_helpers import awkward_images, bomb_png, corrupt_jpeg, image_bytes, rgb_array

TESTS = Path(__file__).resolve().parent
CASES = awkward_images()


def encoded(image: Image.Image, fmt: str = "PNG", **save_args) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **save_args)
    return buf.getvalue()


def thin_png(width: int = 1, height: int = 30000) -> bytes:
    return encoded(Image.new("RGB", (width, height), (120, 30, 200)))


def embed(encoder, image: Image.Image) -> torch.Tensor:
    pixels = torch.from_numpy(encoder.preprocessor()(image)[None])  # (1, 3, H, W)
    return encoder.encode_pixels(pixels)[0]  # (C,)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


@pytest.fixture(scope="module")
def encoder(tiny_clip):
    from prefixcap.model.encoders import load_encoder

    return load_encoder(tiny_clip, device="cpu")


# --- awkward inputs: a skip reason or a counted conversion, never a crash ---------------------------
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
    assert decode_image(corrupt_jpeg()).reason in {"corrupt", "truncated"}


def test_good_image_pixels_are_kept():
    out = decode_image(image_bytes(3, "PNG"))
    assert np.array_equal(np.asarray(out.image), rgb_array(3))


def test_alpha_is_composited_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)  # fully transparent black
    out = decode_image(encoded(Image.fromarray(rgba, "RGBA")))
    assert np.all(np.asarray(out.image) == 255)


def test_decompression_bomb_with_default_limit():
    # 10000 x 10000 = 100 Mpx > PIL's default 89 Mpx; the file itself is small.
    data = bomb_png(10000, 10000)
    assert len(data) < 200_000
    with pytest.warns(Image.DecompressionBombWarning):  # PIL's own check (1x-2x its limit) only warns
        out = decode_image(data)
    assert out.reason == "too_large" and out.size == (10000, 10000)


def test_formats_restrict_the_decoders():
    assert decode_image(image_bytes(1, "BMP"), formats=("PNG",)).reason == "not_an_image"
    assert decode_image(image_bytes(1, "PNG"), formats=("PNG",)).image is not None


def test_jpeg_draft_keeps_size_above_target():
    data = image_bytes(0, size=(640, 480))
    out = decode_image(data, draft_size=224)
    assert min(out.image.size) >= 224 and out.image.size[0] < 640


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA", "L", "P", "CMYK", "I;16", "I", "F", "1"])
def test_to_rgb_converts_every_mode(mode):
    out = to_rgb(Image.new(mode, (5, 4)))
    assert out.mode == "RGB" and out.size == (5, 4)


# --- EXIF orientation ---------------------------------------------------------------------------------
def test_exif_rotated_jpeg_embeds_like_the_image_rotated_by_hand(encoder):
    stored = rgb_array(11, size=(48, 32))  # (32, 48, 3) as the camera wrote it: on its side
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    rotated_file = encoded(Image.fromarray(stored), "JPEG", quality=95, exif=exif)
    plain_file = encoded(Image.fromarray(stored), "JPEG", quality=95)  # same pixels, no EXIF
    out = decode_image(rotated_file)
    assert out.conversions == ["exif_orientation"] and out.image.size == (32, 48)
    by_hand = Image.fromarray(np.rot90(np.asarray(decode_image(plain_file).image), k=-1))  # clockwise
    assert np.array_equal(np.asarray(out.image), np.asarray(by_hand))
    upright, sideways = embed(encoder, out.image), embed(encoder, decode_image(plain_file).image)
    assert torch.allclose(upright, embed(encoder, by_hand), atol=1e-6)
    assert cosine(upright, sideways) < 0.999  # the rotation does change what the encoder sees
    # An opened PIL image (not yet decoded by us) is put upright as well.
    assert np.array_equal(np.asarray(load_image(Image.open(io.BytesIO(rotated_file)))), np.asarray(by_hand))


# --- bit depth ----------------------------------------------------------------------------------------
def test_16_bit_png_embeds_like_its_8_bit_version(encoder):
    # A dark picture (max 120): stretching by its own maximum would double its brightness.
    gray = (rgb_array(12, size=(40, 30))[..., 0] // 2 + 10).astype(np.uint8)  # (30, 40), 10..137
    eight = decode_image(encoded(Image.fromarray(gray, "L")))
    sixteen = decode_image(encoded(Image.fromarray(gray.astype(np.uint16) * 257)))  # saved as I;16
    assert Image.open(io.BytesIO(encoded(Image.fromarray(gray.astype(np.uint16) * 257)))).mode == "I;16"
    assert np.array_equal(np.asarray(sixteen.image), np.asarray(eight.image))
    assert cosine(embed(encoder, sixteen.image), embed(encoder, eight.image)) >= 0.99


def test_16_bit_and_float_modes_are_scaled_by_depth_not_by_their_maximum():
    values = np.array([[0, 60, 120]], np.uint8)
    expected = np.repeat(values[..., None], 3, axis=2)  # (1, 3, 3)
    as_i = Image.fromarray(values.astype(np.int32) * 257)  # mode I: PIL's mode for 16-bit PGM
    as_f = Image.fromarray(values.astype(np.float32) / 255)  # mode F: 0..1
    pgm = decode_image(encoded(Image.fromarray(values.astype(np.uint16) * 257), "PPM"))
    for image in (to_rgb(as_i), to_rgb(as_f), pgm.image):
        assert np.array_equal(np.asarray(image), expected)


# --- extreme aspect ratios ----------------------------------------------------------------------------
def test_bound_aspect_crops_only_extreme_images_around_their_centre():
    normal = Image.new("RGB", (MAX_ASPECT_RATIO * 10, 10))
    assert bound_aspect(normal) is normal
    assert bound_aspect(Image.new("RGB", (1, 30000))).size == (1, MAX_ASPECT_RATIO)
    assert bound_aspect(Image.new("RGB", (30001, 3))).size == (3 * MAX_ASPECT_RATIO + 1, 3)  # even cut
    strip = np.arange(1000, dtype=np.uint8)[None, :, None].repeat(2, 0).repeat(3, 2)  # (2, 1000, 3)
    kept = np.asarray(bound_aspect(Image.fromarray(strip)))
    assert kept.shape == (2, 2 * MAX_ASPECT_RATIO, 3)
    assert np.array_equal(kept, strip[:, 500 - MAX_ASPECT_RATIO:500 + MAX_ASPECT_RATIO])


def test_cropping_a_long_image_keeps_what_the_encoder_sees(encoder):
    """The shortest-edge resize + centre crop keeps the central square: the crop changes nothing in it."""
    image = Image.fromarray(rgb_array(13, size=(30 * (MAX_ASPECT_RATIO + 4), 30)))  # 20:1
    bounded = encoder.preprocessor()(image)  # (3, 32, 32)
    processor = encoder.preprocessor().processor
    whole = np.asarray(processor(images=image, return_tensors="np")["pixel_values"][0])
    assert bounded.shape == whole.shape
    assert np.abs(bounded - whole).max() < 0.05  # resampling round-off only (normalised units)


# --- thread safety ------------------------------------------------------------------------------------
def test_eight_threads_with_mixed_limits_each_get_their_own_answer():
    pil_limit = Image.MAX_IMAGE_PIXELS
    small, large = image_bytes(1, "PNG", size=(60, 50)), image_bytes(2, "PNG", size=(150, 100))  # 3000, 15000 px
    limits = [1000, 2500, 4000, 20000]  # a decoder swapping PIL's global would refuse others' images
    wrong: list[str] = []
    start = threading.Barrier(8)

    def work(t: int) -> None:
        limit = limits[t % len(limits)]
        start.wait()
        for i in range(40):
            data, pixels = (small, 3000) if (t + i) % 2 else (large, 15000)
            out = decode_image(data, max_pixels=limit)
            expected = "too_large" if pixels > limit else None
            if out.reason != expected or (expected is None and out.image.size[0] * out.image.size[1] != pixels):
                wrong.append(f"thread {t} limit {limit}: {pixels} px gave {out.reason}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert wrong == []
    assert Image.MAX_IMAGE_PIXELS == pil_limit  # never touched


# --- a 1x30000 PNG in every stage: bounded time and memory --------------------------------------------
def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _measure(fn):
    """(seconds, MB of peak RSS above the RSS before, result) of fn(); runs in a probe subprocess."""
    import time

    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    before = _status_mb("VmRSS")
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, _status_mb("VmHWM") - before, result


def probe(stage: str, work: str, clip: str, lm: str) -> None:
    """Subprocess entry: run one stage on the thin PNG after a warm-up on a normal image; print JSON."""
    work_dir = Path(work)
    thin, good = work_dir / "thin.png", work_dir / "good.png"
    if stage == "preprocess":
        from prefixcap.preprocess import workers
        from prefixcap.preprocess.cli import main

        measured = {}
        original = workers._process_record

        def timed(setup, record, slot, row):
            if not record.key.endswith("thin"):
                return original(setup, record, slot, row)
            seconds, extra, result = _measure(lambda: original(setup, record, slot, row))
            measured.update(seconds=seconds, extra_mb=extra, result=result.reason or "processed")
            return result

        workers._process_record = timed  # the inline pool (0 workers) looks it up at call time
        rc = main(["--input_dataset", str(work_dir / "folder"), "--input_format", "files", "--output_folder",
                   str(work_dir / "out"), "--clip_model", clip, "--tokenizer_model_type", "gpt2",
                   "--tokenizer_model_variant", lm, "--device", "cpu", "--no_progress",
                   "--num_prepro_workers", "0"])
        measured["rc"] = rc
    elif stage == "caption":
        from prefixcap.caption.captioner import Captioner

        cap = Captioner.from_pretrained(lm, device="cpu")
        cap.caption([str(good)], max_new_tokens=2)  # warm-up: encoder loaded, first batch run
        seconds, extra, result = _measure(lambda: cap.caption([str(thin)], max_new_tokens=2))
        measured = dict(seconds=seconds, extra_mb=extra, result=result[0])
    else:
        from fastapi.testclient import TestClient

        from prefixcap.caption.captioner import Captioner
        from prefixcap.serve.config import ServeConfig
        from prefixcap.serve.app import create_app

        cap = Captioner.from_pretrained(lm, device="cpu")
        with TestClient(create_app(cap, ServeConfig(warmup=False)), base_url="http://127.0.0.1") as client:
            def post(path: Path):
                r = client.post("/v1/captions", files={"images": (path.name, path.read_bytes(), "image/png")},
                                data={"max_new_tokens": "2"})
                return r.status_code, r.json()["results"][0]

            post(good)  # warm-up
            seconds, extra, result = _measure(lambda: post(thin))
        measured = dict(seconds=seconds, extra_mb=extra, result=result)
    print("PROBE " + json.dumps(measured, default=str))


@pytest.fixture(scope="module")
def thin_setup(tmp_path_factory, tiny_gpt2):
    """A 64 px tiny CLIP (the old code spent ~6 s and 1.2 GB on the thin PNG with it), a captioner on it,
    and a folder holding a normal image and the 1x30000 PNG, each with a caption."""
    from prefixcap.demo import tiny_models
    from prefixcap.model.mapping import MappingConfig
    from prefixcap.model import CaptionConfig, CaptionModel

    work = tmp_path_factory.mktemp("thin")
    clip = str(tiny_models.build_tiny_clip(work / "clip64", image_size=64))
    model = CaptionModel(CaptionConfig(clip_model=clip, language_model=tiny_gpt2, lm_family="causal",
                                       mapping=MappingConfig("mlp", prefix_size=16, lm_dim=32, prefix_length=4)))
    artifact = str(model.save_pretrained(work / "captioner"))
    folder = work / "folder"
    folder.mkdir()
    for name, data in (("good", image_bytes(1, "PNG", size=(80, 60))), ("thin", thin_png())):
        (work / f"{name}.png").write_bytes(data)
        (folder / f"{name}.png").write_bytes(data)
        (folder / f"{name}.txt").write_text(f"a {name} picture")
    assert len(thin_png()) < 300
    return work, clip, tiny_gpt2, artifact


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc peak-RSS reset")
@pytest.mark.parametrize("stage", ["preprocess", "caption", "serve"])
def test_thin_png_costs_under_a_second_and_200_mb(stage, thin_setup):
    work, clip, lm, artifact = thin_setup
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/..']; import test_images; "
            "test_images.probe(*sys.argv[2:])")
    proc = subprocess.run([sys.executable, "-c", code, str(TESTS), stage, str(work), clip,
                           lm if stage == "preprocess" else artifact],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    measured = json.loads(lines[-1][len("PROBE "):])
    print(f"{stage}: thin PNG {measured['seconds']:.3f} s, +{measured['extra_mb']:.1f} MB -> {measured['result']}")
    assert measured["seconds"] < 1.0 and measured["extra_mb"] < 200, measured
    if stage == "preprocess":
        assert measured["rc"] == 0 and measured["result"] == "processed"
    elif stage == "caption":
        assert isinstance(measured["result"], str)
    else:
        status, result = measured["result"]
        assert status == 200 and isinstance(result["caption"], str)


def test_load_image_reports_the_reason():
    with pytest.raises(ImageInputError, match="^not_an_image"):
        load_image(b"not an image")
    with pytest.raises(ImageInputError, match="^missing_image"):
        load_image("/nonexistent/picture.png")
    assert load_image(np.zeros((3, 5, 7), np.uint8)).size == (7, 5)  # (C, H, W) uint8 -> RGB
