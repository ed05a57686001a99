"""The page at `/` in a real headless Chromium (Debian's `chromium`, driven by Playwright): load it, generate
from the keyboard, send the result to the editor, paint a mask with the mouse, edit, and check that the
edited image kept every unmasked pixel. Skipped, saying how to get a browser, where none is installed."""

from __future__ import annotations

import base64
import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette", reason="the serve extra is not installed: pip install 'unclip-cli[serve]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: pip install 'unclip-cli[test]'")

from unclip_cli.serve.app import Settings, create_app  # noqa: E402
from unclip_cli.serve.server import running  # noqa: E402

STEPS = {"prior_steps": 2, "decoder_steps": 2, "upsampler_steps": 1}


def chromium() -> str | None:
    """A Chromium to drive: $UNCLIP_CHROMIUM, else Debian's `chromium` (Playwright downloads nothing)."""
    for cand in (os.environ.get("UNCLIP_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


@pytest.fixture(scope="module")
def browser():
    exe = chromium()
    if exe is None:
        pytest.skip("no Chromium found for the browser test: apt-get install chromium (or set UNCLIP_CHROMIUM=/path/to/chromium)")
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    args = ["--no-proxy-server"] + (["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else [])
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=args)
        yield b
        b.close()


def blob_bytes(page, selector: str) -> bytes:
    """The bytes behind an <img>'s src (a blob: URL made by the page)."""
    b64 = page.evaluate("""async (sel) => {
        const res = await fetch(document.querySelector(sel).src);
        const bytes = new Uint8Array(await res.arrayBuffer());
        let s = ""; for (const b of bytes) s += String.fromCharCode(b);
        return btoa(s);
    }""", selector)
    return base64.b64decode(b64)


def decoded(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def test_generate_paint_edit_keeps_unmasked_pixels(browser, tiny_engine, tmp_path):
    with running(create_app(tiny_engine, Settings(steps=STEPS))) as (url, _):
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        requested, problems = [], []
        page.on("request", lambda r: requested.append(r.url))
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.goto(url + "/")
        sync_api.expect(page.locator("#model")).to_contain_text(tiny_engine.name)

        # Generate, from the keyboard.
        page.fill("#gen-n", "1")
        page.fill("#gen-seed", "5")
        page.fill("#gen-prompt", "a red circle")
        page.press("#gen-prompt", "Control+Enter")
        made = page.locator(".run[data-op=generate] .card")
        sync_api.expect(made).to_have_count(1, timeout=60_000)
        sync_api.expect(made.locator(".meta")).to_contain_text("seed 5")
        recipe = made.locator(".recipe").text_content()  # the recipe, read from the PNG's text chunk
        assert "op generate" in recipe and "prompt a red circle" in recipe and "seed 5" in recipe
        assert made.locator("a[download]").get_attribute("download") == "unclip-generate-5.png"
        source = decoded(blob_bytes(page, ".run[data-op=generate] .card img"))

        # Send it to the editor and paint over part of it.
        made.get_by_role("button", name="Edit with seed 5").click()
        sync_api.expect(page.locator("#p-edit")).to_be_visible()
        sync_api.expect(page.locator("#stage")).to_have_attribute("data-ready", "1")
        box = page.locator("#edit-mask").bounding_box()
        page.mouse.move(box["x"] + 0.15 * box["width"], box["y"] + 0.2 * box["height"])
        page.mouse.down()
        page.mouse.move(box["x"] + 0.45 * box["width"], box["y"] + 0.55 * box["height"], steps=8)
        page.mouse.up()
        page.fill("#edit-prompt", "a green star")
        page.fill("#edit-n", "1")
        page.click("#edit-go")
        edited = page.locator(".run[data-op=edit] .card")
        sync_api.expect(edited).to_have_count(1, timeout=60_000)
        page.screenshot(path=str(tmp_path / "page.png"))

        mask = decoded(blob_bytes(page, ".run[data-op=edit] img.mask"))
        result = decoded(blob_bytes(page, ".run[data-op=edit] .card img"))
        kept = np.asarray(mask.getchannel("A")) >= 128  # the page sends transparent = repaint
        assert mask.size == source.size == result.size
        assert kept.any() and not kept.all(), kept
        assert np.array_equal(np.asarray(result.convert("RGB"))[kept], np.asarray(source.convert("RGB"))[kept])

        assert not problems, problems
        assert all(u.startswith((url + "/", "blob:", "data:")) for u in requested), requested
        page.close()
