"""Small synthetic inputs for the preprocess tests: images of every awkward kind, tars, tables."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def rgb_array(seed: int, size: tuple[int, int] = (40, 30)) -> np.ndarray:
    w, h = size
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def image_bytes(seed: int = 0, fmt: str = "JPEG", mode: str = "RGB", size: tuple[int, int] = (40, 30)) -> bytes:
    image = Image.fromarray(rgb_array(seed, size))
    if mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE)
    elif mode == "I;16":
        image = Image.fromarray(rgb_array(seed, size)[..., 0].astype(np.uint16) * 257)  # mode I;16
    elif mode != "RGB":
        image = image.convert(mode)
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def animated_gif(seed: int = 0) -> bytes:
    frames = [Image.fromarray(rgb_array(seed + i)).convert("P") for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def bomb_png(width: int = 4000, height: int = 3000) -> bytes:
    """A tiny file that claims many pixels (a 1-bit blank image compresses to almost nothing)."""
    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, "PNG")
    return buf.getvalue()


def truncated_jpeg(seed: int = 0) -> bytes:
    data = image_bytes(seed, size=(64, 48))
    return data[: len(data) // 2]


def corrupt_jpeg(seed: int = 0) -> bytes:
    data = bytearray(image_bytes(seed, size=(64, 48)))
    data[200:] = bytes(len(data) - 200)  # the header survives; the entropy-coded data is gone
    return bytes(data)


# name -> (bytes, expected skip reason or None, expected conversion or None)
def awkward_images() -> dict[str, tuple[bytes, str | None, str | None]]:
    return {
        "good": (image_bytes(1), None, None),
        "zero_byte": (b"", "empty_file", None),
        "not_image": (b"this is not an image at all", "not_an_image", None),
        "truncated": (truncated_jpeg(2), "truncated", None),
        "cmyk": (image_bytes(3, "JPEG", "CMYK"), None, "cmyk"),
        "palette": (image_bytes(4, "PNG", "P"), None, "palette"),
        "grayscale": (image_bytes(5, "PNG", "L"), None, "grayscale"),
        "gray16": (image_bytes(6, "PNG", "I;16"), None, "grayscale"),
        "alpha": (image_bytes(7, "PNG", "RGBA"), None, "alpha"),
        "animated": (animated_gif(8), None, "animated"),
        "bomb": (bomb_png(), "too_large", None),
    }


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def simple_webdataset(folder: Path, num_tars: int = 3, per_tar: int = 4, size: tuple[int, int] = (40, 30)) -> list[Path]:
    """num_tars tars of per_tar good jpg+txt samples with distinct images and captions."""
    tars = []
    for t in range(num_tars):
        samples = [(f"{t:03d}{i:04d}", {"jpg": image_bytes(t * 100 + i, size=size),
                                        "txt": f"a photo of a red circle number {t * 100 + i}".encode()})
                   for i in range(per_tar)]
        tars.append(write_tar(folder / f"{t:03d}.tar", samples))
    return tars


def _child_main(main, args: list[str], env: dict[str, str]) -> None:
    import os
    import sys

    import torch

    os.environ.update(env)
    torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork
    sys.exit(main(args))


def fork_main(main, args: list[str], **env: str):
    """Run a command's `main(args)` in a forked child: a real process that can be killed (`kill -9`), without
    re-importing torch. `env` is added to the child's environment (e.g. WORLD_SIZE/RANK)."""
    import multiprocessing as mp

    child = mp.get_context("fork").Process(target=_child_main, args=(main, args, env))
    child.start()
    return child


def kill_after_files(child, folder: Path, pattern: str, count: int, timeout: float = 240, poll: float = 0.01) -> None:
    """kill -9 a fork_main child as soon as `count` files matching `pattern` exist in `folder` (finished
    pieces of its run): an interruption with some work done and some not."""
    import os
    import signal
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and child.is_alive():
        if len(list(folder.glob(pattern))) >= count:
            break
        time.sleep(poll)
    assert child.is_alive(), "the child finished before it could be killed"
    os.kill(child.pid, signal.SIGKILL)
    child.join(timeout=30)
    assert child.exitcode == -signal.SIGKILL


def run_args(inputs, out, clip, lm, *extra, fmt="webdataset", model_type="gpt2"):
    """`prefixcap preprocess` flags for a CPU run of the tiny models, no progress bar."""
    inputs = [inputs] if isinstance(inputs, (str, Path)) else inputs
    return ["--input_dataset", *map(str, inputs), "--output_folder", str(out), "--input_format", fmt,
            "--clip_model", clip, "--tokenizer_model_type", model_type, "--tokenizer_model_variant", lm,
            "--device", "cpu", "--no_progress", *extra]


def reference_embeddings(clip, images: dict[str, bytes]) -> dict[str, np.ndarray]:
    """The encoder's own output: its own preprocessor, one image at a time, fp32."""
    import torch

    from PIL import Image

    from prefixcap.model.encoders import load_encoder

    encoder = load_encoder(clip, device="cpu")
    pre = encoder.preprocessor()
    out = {}
    for key, data in images.items():
        pixels = torch.from_numpy(pre(Image.open(io.BytesIO(data)).convert("RGB"))[None])  # (1, 3, H, W)
        out[key] = encoder.encode_pixels(pixels)[0].numpy()  # (C,)
    return out
