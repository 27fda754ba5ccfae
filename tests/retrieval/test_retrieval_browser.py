"""The web page of a retrieval model in headless Chromium: "show retrieved captions" lists each image's retrieved
captions under its caption, and only when ticked."""

from __future__ import annotations

import numpy as np
from PIL import Image
from test_retrieval_model import setup  # noqa: F401 - the module fixture: a tiny model trained with a datastore

from browser_helpers import launch, skip_module_without_chromium

skip_module_without_chromium()
from playwright import sync_api  # noqa: E402


def test_page_shows_retrieved_captions_when_ticked(setup, tmp_path):  # noqa: F811
    from prefixcap.caption.captioner import Captioner
    from prefixcap.serve.app import create_app
    from prefixcap.serve.config import ServeConfig
    from prefixcap.serve.http import background_server

    cap = Captioner.from_pretrained(setup["model"])
    rng = np.random.default_rng(5)
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(paths[-1])
    expected = cap.retriever.captions(cap.encode_pixels(cap.load_pixels([paths[0]])).numpy())[0]
    app = create_app(cap, ServeConfig(model="retrieval test model", max_new_tokens_limit=5))
    with background_server(app) as url, sync_api.sync_playwright() as pw:
        browser = launch(pw)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            sync_api.expect(page.locator("#model-info")).to_contain_text("retrieval: 2 captions from ds")
            sync_api.expect(page.locator("#retrieved-label")).to_be_visible()
            page.check("#show-retrieved")
            page.set_input_files("#file-input", str(paths[0]))
            sync_api.expect(page.locator(".card[data-state=done]")).to_have_count(1, timeout=20_000)
            items = page.locator(".card .retrieved li")
            sync_api.expect(items).to_have_count(len(expected))
            shown = [items.nth(i).evaluate("li => li.firstChild.textContent") for i in range(len(expected))]
            assert shown == expected
            page.uncheck("#show-retrieved")
            page.set_input_files("#file-input", str(paths[1]))
            sync_api.expect(page.locator(".card[data-state=done]")).to_have_count(2, timeout=20_000)
            assert page.locator(".card .retrieved").count() == 1  # the new card has none
        finally:
            browser.close()
