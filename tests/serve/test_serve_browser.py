"""The web page in headless Chromium: pick and drop images, see their captions, greedy and beam search."""

from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from browser_helpers import launch, skip_module_without_chromium

skip_module_without_chromium()
from playwright import sync_api  # noqa: E402 - in the test extra; only the browser binary is a system package

from prefixcap.serve.batching import BatchConfig  # noqa: E402
from prefixcap.serve.config import ServeConfig  # noqa: E402
from prefixcap.serve.http import background_server  # noqa: E402
from prefixcap.serve.app import create_app  # noqa: E402

DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "serve_screenshot.png"


def picture(kind: str) -> Image.Image:
    """Small but recognisable pictures, so the screenshot shows something."""
    y, x = np.mgrid[0:96, 0:128]
    if kind == "gradient":
        arr = np.stack([x * 2, y * 2, 255 - x], -1).clip(0, 255).astype(np.uint8)
        return Image.fromarray(arr)
    image = Image.new("RGB", (128, 96), (120, 170, 230) if kind == "sun" else (40, 120, 60))
    draw = ImageDraw.Draw(image)
    if kind == "sun":
        draw.rectangle((0, 70, 128, 96), fill=(60, 140, 70))
        draw.ellipse((80, 10, 112, 42), fill=(250, 210, 40))
    else:
        draw.polygon([(20, 90), (64, 10), (108, 90)], fill=(240, 240, 240))
    return image


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def captioner(tiny_clip, tiny_gpt2, tmp_path_factory):
    from prefixcap.caption.captioner import Captioner
    from prefixcap.model.mapping import MappingConfig
    from prefixcap.model import CaptionConfig, CaptionModel

    model = CaptionModel(CaptionConfig(clip_model=tiny_clip, language_model=tiny_gpt2, lm_family="causal",
                                       mapping=MappingConfig("mlp", prefix_size=16, lm_dim=32, prefix_length=4)))
    path = model.save_pretrained(tmp_path_factory.mktemp("browser") / "tiny_captioner")
    return Captioner.from_pretrained(path, device="cpu")


def test_page_captions_picked_and_dropped_images(captioner, tmp_path):
    images = {name: picture(kind) for name, kind in
              [("gradient.png", "gradient"), ("sunny-field.png", "sun"), ("mountain.png", "mountain")]}
    for name, image in images.items():
        image.save(tmp_path / name)
    max_tokens = 8  # the server default below; the page sends no max_new_tokens
    greedy = dict(zip(images, captioner.caption(list(images.values()), max_new_tokens=max_tokens)))
    beam = captioner.caption([images["mountain.png"]], max_new_tokens=max_tokens, num_beams=3)[0]
    config = ServeConfig(model="tiny random test model", batch=BatchConfig(max_wait_ms=5),
                         max_new_tokens_limit=max_tokens)
    app = create_app(captioner, config)

    with background_server(app) as url, sync_api.sync_playwright() as pw:
        browser = launch(pw)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 640})
            page.goto(url + "/")
            sync_api.expect(page.locator("#model-info")).to_contain_text("prefix length 4")

            # Pick two files with the file chooser (greedy is the default).
            page.set_input_files("#file-input", [str(tmp_path / "gradient.png"), str(tmp_path / "sunny-field.png")])
            # Drop one file on the drop zone, with beam search selected.
            page.check("input[name=decoding][value=beam]")
            page.fill("#num-beams", "3")
            page.evaluate("""(b64) => {
                const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                const dt = new DataTransfer();
                dt.items.add(new File([bytes], "mountain.png", {type: "image/png"}));
                document.querySelector("#drop").dispatchEvent(
                    new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
            }""", base64.b64encode(png_bytes(images["mountain.png"])).decode())

            cards = page.locator(".card")
            sync_api.expect(cards).to_have_count(3)
            sync_api.expect(page.locator(".card[data-state=done]")).to_have_count(3, timeout=20_000)
            shown = {}
            for i in range(3):
                card = cards.nth(i)
                shown[card.locator(".name").text_content()] = card.locator(".caption").text_content()
            assert shown == {"gradient.png": greedy["gradient.png"], "sunny-field.png": greedy["sunny-field.png"],
                             "mountain.png": beam}
            # Each card shows its picture (the browser decoded the object URL).
            assert page.evaluate("Array.from(document.querySelectorAll('.card img')).every(i => i.naturalWidth == 128)")

            # A non-image shows the server's message on its card, not a broken page.
            (tmp_path / "notes.txt").write_text("not a picture")
            page.set_input_files("#file-input", str(tmp_path / "notes.txt"))
            sync_api.expect(page.locator(".card[data-state=error] .error")).to_contain_text("not an image")

            shot = tmp_path / "serve_screenshot.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    # Refreshing the committed screenshot is opt-in so a test run leaves the tree clean.
    if os.environ.get("PREFIXCAP_UPDATE_SCREENSHOT"):
        shutil.copyfile(shot, DOCS_SCREENSHOT)
