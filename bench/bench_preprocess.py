"""Preprocess throughput: prefixcap's runner end to end vs the encoder alone, and vs per-caption encoding.

  end-to-end  prefixcap.preprocess.run.run_preprocess on webdataset shards of 640x480 JPEGs with five
              captions per image (read, decode, resize/crop in worker processes, encode, write shards)
  encoder     the same CLIP ViT-B/32 encode_pixels on already-decoded tensors at the same batch size
              (measured before and after the end-to-end run; the mean is used)
  reference   the original parse_coco: every caption's image decoded and encoded alone (batch 1)
Figures: end-to-end / encoder images/s (target >= 0.9), encoder passes and images encoded vs the
reference for the same captions (target 5x fewer images), captions/s vs the reference.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time

from bench.common import (
    THREADS_HELP,
    WORK,
    machine_info,
    print_header,
    ratio,
    set_threads,
    write_result,
)


def encoder_throughput(encoder, batch_size: int, batches: int) -> float:
    import torch

    x = torch.randn(batch_size, 3, 224, 224)
    encoder.encode_pixels(x[:2])  # warm-up
    start = time.perf_counter()
    for _ in range(batches):
        encoder.encode_pixels(x)
    return batch_size * batches / (time.perf_counter() - start)


def decode_cost_ms(tars: list[str], encoder, n: int = 32) -> float:
    """Single-core cost of decode + the encoder's resize/crop per 640x480 JPEG (what workers do)."""
    import io
    import tarfile

    from PIL import Image

    from prefixcap.data.images import to_rgb

    jpegs = []
    with tarfile.open(tars[0]) as tf:
        for m in tf.getmembers():
            if m.name.endswith(".jpg"):
                jpegs.append(tf.extractfile(m).read())
            if len(jpegs) == n:
                break
    fn = encoder.preprocessor()
    start = time.perf_counter()
    for j in jpegs:
        fn(to_rgb(Image.open(io.BytesIO(j))))
    return (time.perf_counter() - start) / len(jpegs) * 1e3


class CountingEncoder:
    """Counts encoder forward passes and images through the class method every instance uses."""

    def __init__(self):
        self.calls = 0
        self.images = 0

    def install(self):
        from prefixcap.model.encoders import HFClipEncoder

        original = HFClipEncoder.encode_pixels
        counter = self

        def counted(enc, pixels):
            counter.calls += 1
            counter.images += int(pixels.shape[0])
            return original(enc, pixels)

        HFClipEncoder.encode_pixels = counted
        return original


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few images: a few minutes on 2 CPU cores")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="prefixcap's --num_prepro_workers")
    p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    args = p.parse_args(argv)
    set_threads(args.threads)
    q = args.quick
    n_images = 128 if q else 512
    n_ref_images = 6 if q else 16
    settings = {"threads": args.threads, "mode": "quick" if q else "full", "encoder": "CLIP ViT-B/32 vision tower (random weights)",
                "images": n_images, "image_size": "640x480 JPEG (~100 KB)", "captions_per_image": 5,
                "batch_size": args.batch_size, "num_prepro_workers": args.workers,
                "reference_images": n_ref_images, "dtype": "float32 (CPU)"}
    info = machine_info()
    print_header("bench_preprocess", settings, info)

    from bench.builders import CLIP_DIR, GPT2_DIR, build_clip_vit_b32, build_gpt2_small
    from bench.reference import encode_per_caption
    from bench.synthetic import write_jpeg_shards
    from prefixcap.data.readers import ReaderOptions
    from prefixcap.model.encoders import load_encoder
    from prefixcap.preprocess.run import PreprocessConfig, run_preprocess

    build_clip_vit_b32()
    build_gpt2_small()
    print("writing JPEG shards ...", flush=True)
    tars = write_jpeg_shards(WORK / "data" / f"jpeg_{n_images}", n_images, captions_per_image=5)
    encoder = load_encoder(str(CLIP_DIR), device="cpu")
    batches = max(2, n_images // args.batch_size // 2)
    print("encoder alone on decoded tensors ...", flush=True)
    enc_before = encoder_throughput(encoder, args.batch_size, batches)
    print(f"  {enc_before:.2f} images/s")

    counter = CountingEncoder()
    original = counter.install()
    out = WORK / "out" / "preprocess_bench"
    shutil.rmtree(out, ignore_errors=True)
    cfg = PreprocessConfig(input_dataset=[str(t) for t in tars], output_folder=str(out),
                           input_format="webdataset",
                           reader=ReaderOptions(wds_caption_in_metadata=True, wds_caption_key="captions"),
                           batch_size=args.batch_size, num_prepro_workers=args.workers, clip_model=str(CLIP_DIR),
                           tokenizer_model_type="gpt2", tokenizer_model_variant=str(GPT2_DIR), device="cpu",
                           progress=False)
    print("prefixcap preprocess end to end ...", flush=True)
    start = time.perf_counter()
    summary = run_preprocess(cfg)
    wall = time.perf_counter() - start
    e2e = summary.num_images / summary.seconds
    prefixcap_calls, prefixcap_images = counter.calls, counter.images
    print(f"  {e2e:.2f} images/s ({summary.num_images} images, {summary.num_captions} captions, "
          f"{summary.seconds:.1f}s in the runner, {wall:.1f}s with model loading)")

    print("encoder alone again ...", flush=True)
    enc_after = encoder_throughput(encoder, args.batch_size, batches)
    print(f"  {enc_after:.2f} images/s")
    enc = (enc_before + enc_after) / 2

    print("reference: per-caption encoding at batch 1 ...", flush=True)
    import tarfile

    pairs = []
    with tarfile.open(tars[0]) as tf:
        members = {m.name: m for m in tf.getmembers()}
        keys = sorted({n.split(".")[0] for n in members})[:n_ref_images]
        for k in keys:
            jpeg = tf.extractfile(members[f"{k}.jpg"]).read()
            for c in json.loads(tf.extractfile(members[f"{k}.json"]).read())["captions"]:
                pairs.append((jpeg, c))
    counter.calls = counter.images = 0
    start = time.perf_counter()
    _, caps, passes = encode_per_caption(pairs, encoder.preprocessor(), encoder.encode_pixels)
    t_ref = time.perf_counter() - start
    ref_captions_per_s = len(caps) / t_ref
    ours_captions_per_s = summary.num_captions / summary.seconds
    decode_ms = decode_cost_ms(tars, encoder)
    from prefixcap.model.encoders import HFClipEncoder

    HFClipEncoder.encode_pixels = original
    enc_ms = 1e3 / enc
    cores = info["affinity"] or info["cpu_count"]
    threads = info["torch_threads"]
    # Best case on a CPU-only machine: the encoder's threads and the decode workers share `cores`.
    bound = enc_ms / max(enc_ms, (enc_ms * threads + decode_ms) / cores)
    figures = {
        "encoder_images_per_s": round(enc, 3), "encoder_images_per_s_before": round(enc_before, 3),
        "encoder_images_per_s_after": round(enc_after, 3),
        "end_to_end_images_per_s": round(e2e, 3), "end_to_end_over_encoder": ratio(e2e, enc),
        "end_to_end_captions_per_s": round(ours_captions_per_s, 3),
        "reference_captions_per_s": round(ref_captions_per_s, 3),
        "captions_per_s_speedup_vs_reference": ratio(ours_captions_per_s, ref_captions_per_s),
        "prefixcap_encoder_calls": prefixcap_calls, "prefixcap_images_encoded": prefixcap_images,
        "captions": summary.num_captions,
        "reference_encoder_calls_same_captions": summary.num_captions,  # one batch-1 pass per caption
        "images_encoded_ratio": ratio(summary.num_captions, prefixcap_images),
        "forward_passes_ratio": ratio(summary.num_captions, prefixcap_calls),
        "reference_measured_passes_per_caption": ratio(passes, len(caps)),
        "decode_resize_ms_per_image_1core": round(decode_ms, 2), "encoder_ms_per_image": round(enc_ms, 2),
        "cpu_sharing_bound": round(bound, 3),
    }
    print(f"end-to-end / encoder: {figures['end_to_end_over_encoder']} (CPU-sharing bound {bound:.3f}: decoding "
          f"{decode_ms:.1f} ms/image on one core, the encoder {enc_ms:.0f} ms/image on {threads} thread(s), "
          f"{cores} cores)")
    print(f"images encoded: {prefixcap_images} vs {summary.num_captions} per caption "
          f"({figures['images_encoded_ratio']}x fewer); forward passes {prefixcap_calls} vs {summary.num_captions} "
          f"({figures['forward_passes_ratio']}x fewer)")
    print(f"captions/s: prefixcap {ours_captions_per_s:.2f} vs per-caption reference {ref_captions_per_s:.2f} "
          f"({figures['captions_per_s_speedup_vs_reference']}x)")
    notes = ["On a CPU-only machine the decode workers and the encoder share the same cores, so decoding "
             "cannot always be hidden; cpu_sharing_bound = t_enc / max(t_enc, (t_enc * threads + t_decode) / cores) "
             "(per image, t_decode on one core) is the best "
             "achievable end_to_end_over_encoder here. On a GPU the encoder does not use the CPU cores."]
    write_result("preprocess", settings, info, figures, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
