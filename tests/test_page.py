"""The page at `/` in a real headless Chromium (Debian's `chromium`, driven by Playwright): load it, generate
from the keyboard, send the result to the editor, paint a mask with the mouse, edit, and check that the
edited image kept every unmasked pixel. Skipped, saying how to get a browser, where none is installed."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette", reason="the serve extra is not installed: pip install 'unclip-cli[serve]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: pip install 'unclip-cli[test]'")

httpx = pytest.importorskip("httpx", reason="the test extra is not installed: pip install 'unclip-cli[test]'")

from unclip_cli.progress import Tick  # noqa: E402
from unclip_cli.serve.app import Settings, create_app  # noqa: E402
from unclip_cli.serve.server import running  # noqa: E402
from held import HeldAtFirstStep, HeldEngine  # noqa: E402

STEPS = {"prior_steps": 2, "decoder_steps": 2, "upsampler_steps": 1}


def watched_page(browser, fresh_at: str | None = None):
    """A new desktop-sized page, and the list its script errors and console errors are collected in; with `fresh_at`,
    opened at that server's page with nothing stored from an earlier test."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    problems = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    if fresh_at:
        page.goto(fresh_at + "/")
        page.evaluate("localStorage.clear()")
        page.reload()
    return page, problems


def send_generate(page, prompt: str, n: int, seed: int) -> None:
    """Fill the Generate form and send it, as a user does with the mouse."""
    page.fill("#gen-n", str(n))
    page.fill("#gen-seed", str(seed))
    page.fill("#gen-prompt", prompt)
    page.click("#gen-go")


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
        page, problems = watched_page(browser)
        requested = []
        page.on("request", lambda r: requested.append(r.url))
        page.goto(url + "/")
        sync_api.expect(page.locator("#model")).to_contain_text(tiny_engine.name)
        sync_api.expect(page.locator("#p-generate .keys")).to_be_visible()  # hidden at phone width

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
        # named as the CLI names the run (x-unclip-names): prompt, the tiny set, the server's steps, first seed, index
        assert re.fullmatch(r"a-red-circle-tiny-[a-z0-9-]+-5-0\.png", made.locator("a[download]").get_attribute("download"))
        source = decoded(blob_bytes(page, ".run[data-op=generate] .card img"))

        # Send it to the editor and paint over part of it.
        # Each button under a result names the image it acts on (a screen reader heard "Edit with seed 5"); the visible
        # text stays short.
        name = made.locator("a[download]").get_attribute("download")
        acts = made.locator(".acts > *")
        assert acts.all_text_contents() == ["Vary", "Edit", "Nudge", "Blend A", "Blend B", "Mix", "Save"]
        assert acts.evaluate_all("els => els.map((e) => e.getAttribute('aria-label'))") == [
            f"{label} {name}" for label in ("Vary", "Edit", "Nudge", "Blend A", "Blend B", "Mix", "Save")]
        made.get_by_role("button", name=f"Edit {name}", exact=True).click()
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


def mask_alpha(page) -> int:
    """How many mask pixels are painted."""
    return page.evaluate("""() => {
        const c = document.querySelector("#edit-mask");
        const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] >= 128; return n;
    }""")


def test_undo_redo_feather_and_history_across_reloads(browser, tiny_engine):
    with running(create_app(tiny_engine, Settings(steps=STEPS))) as (url, _):
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        problems = []
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(url + "/")
        page.evaluate("localStorage.clear()")
        page.reload()
        sync_api.expect(page.locator("#history")).to_be_hidden()
        send_generate(page, "a red circle", n=1, seed=9)
        sync_api.expect(page.locator(".run[data-op=generate] .card")).to_have_count(1, timeout=60_000)
        page.get_by_role("button", name=re.compile(r"^Edit .*-9-0\.png$")).click()
        sync_api.expect(page.locator("#stage")).to_have_attribute("data-ready", "1")

        # Two strokes; undo twice, redo once; Ctrl+Z undoes too; a clear is undone like a stroke.
        box = page.locator("#edit-mask").bounding_box()
        for y in (0.2, 0.7):
            page.mouse.move(box["x"] + 0.2 * box["width"], box["y"] + y * box["height"])
            page.mouse.down()
            page.mouse.move(box["x"] + 0.6 * box["width"], box["y"] + y * box["height"], steps=5)
            page.mouse.up()
        both = mask_alpha(page)
        page.click("#mask-undo")
        one = mask_alpha(page)
        assert 0 < one < both
        page.click("#mask-undo")
        assert mask_alpha(page) == 0 and page.locator("#mask-undo").is_disabled()
        page.click("#mask-redo")
        assert mask_alpha(page) == one
        page.click("#mask-redo")
        assert mask_alpha(page) == both and page.locator("#mask-redo").is_disabled()
        page.click("#brush-clear")
        assert mask_alpha(page) == 0
        page.keyboard.press("Control+z")
        assert mask_alpha(page) == both

        # The feather slider starts at auto (nothing sent: the server scales its default to the image); set, it reaches the recipe.
        assert page.locator("#edit-feather-out").text_content() == "auto"
        page.locator("#edit-feather").fill("3")
        page.fill("#edit-prompt", "a green star")
        page.fill("#edit-n", "1")
        page.click("#edit-go")
        edited = page.locator(".run[data-op=edit] .card")
        sync_api.expect(edited).to_have_count(1, timeout=60_000)
        assert "feather 3" in edited.locator(".recipe").text_content()
        before = page.locator(".run .card img").evaluate_all("els => els.map(e => e.alt)")

        # A reload keeps both runs, newest first, with their recipes and the edit's mask; Clear history forgets them.
        page.reload()
        sync_api.expect(page.locator(".run")).to_have_count(2)
        assert page.locator(".run").first.get_attribute("data-op") == "edit"
        assert page.locator(".run .card img").evaluate_all("els => els.map(e => e.alt)") == before
        assert "feather 3" in page.locator(".run[data-op=edit] .recipe").text_content()
        assert page.locator(".run[data-op=edit] img.mask").count() == 1
        sync_api.expect(page.locator("#history-note")).to_have_text("2 runs kept in this browser.")
        page.click("#history-clear")
        sync_api.expect(page.locator(".run")).to_have_count(0)
        page.reload()
        sync_api.expect(page.locator(".run")).to_have_count(0)
        sync_api.expect(page.locator("#intro")).to_be_visible()
        assert not problems, problems
        page.close()


def one_image(segments):
    """Segments of batches of one image (as the server reports them: stage, total, batch, batches, steps done, seconds,
    seconds of the first step, images)."""
    return [[*g, 1] for g in segments]


# A last job of two batches: prior 1 s a step, decoder 0.5 s, upsampler 1 s, first steps too.
LAST = one_image([["prior", 4, 1, 2, 4, 4.0, 1.0], ["decoder", 10, 1, 2, 10, 5.0, 0.5], ["upsampler", 2, 1, 2, 2, 2.0, 1.0],
                  ["prior", 4, 2, 2, 4, 4.0, 1.0], ["decoder", 10, 2, 2, 10, 5.0, 0.5], ["upsampler", 2, 2, 2, 2, 2.0, 1.0]])
VARY = one_image([["invert", 10, 1, 1, 10, 5.0, 0.5], ["decoder", 10, 1, 1, 10, 5.0, 0.5], ["upsampler", 2, 1, 1, 2, 1.0, 0.5]])
# Long jobs whose stages start cold: the first step of a stage in a job takes several steps' time (prior 5 s then 1 s a
# step, decoder 3 s then 0.5 s, upsampler 4 s then 1 s); in later batches a first step is warm (1.2, 0.6, 1.2 s).
LONG1 = one_image([["prior", 10, 1, 1, 10, 14.0, 5.0], ["decoder", 20, 1, 1, 20, 12.5, 3.0], ["upsampler", 5, 1, 1, 5, 8.0, 4.0]])
LONG4 = [[stage, n, 1, 4, n, seconds, first, 1] for stage, n, _, _, _, seconds, first, _ in LONG1] + one_image([
    run for b in (2, 3, 4) for run in (["prior", 10, b, 4, 10, 10.2, 1.2], ["decoder", 20, b, 4, 20, 10.1, 0.6], ["upsampler", 5, b, 4, 5, 5.2, 1.2])])
IN_BATCH_2 = LONG4[:3] + one_image([["prior", 10, 2, 4, 10, 10.2, 1.2], ["decoder", 20, 2, 4, 5, 2.6, 0.6]])  # 47.3 s done
# Ten images are a batch of 8 and one of 2: each step takes 0.5 s an image in the prior, 0.25 s in the decoder.
TEN = [["prior", 4, 1, 2, 4, 16.0, 4.0, 8], ["decoder", 10, 1, 2, 10, 20.0, 2.0, 8],
       ["prior", 4, 2, 2, 4, 4.0, 1.0, 2], ["decoder", 10, 2, 2, 10, 5.0, 0.5, 2]]
ESTIMATES = [  # (this job's segments, seconds since its last step, the last job's segments, images) -> (seconds left, share done)
    # The first job's first step: no pace yet (a first step is slower than the rest), nothing known after: estimating.
    (one_image([["prior", 4, 1, 2, 1, 1.0, 1.0]]), 0.25, None, None, None, None),
    # Two steps into the first job's prior with a last job: the rest of this prior, then decoder and upsampler, then the whole second batch, less the
    # half step already run: 2 + 5 + 2 + 11 - 0.5.
    (one_image([["prior", 4, 1, 2, 2, 2.0, 1.0]]), 0.5, LAST, 2, 19.5, 2.5 / 22),
    # The first job, in its second batch: its own first batch says what is left (5 decoder steps at 0.5, 2 upsampler at 1).
    (LAST[:4] + one_image([["decoder", 10, 2, 2, 5, 2.5, 0.5]]), 0.25, None, 2, 4.25, 17.75 / 22),
    # This job's decoder runs at 0.25 s a step where the last one's ran at 0.5: its own speed counts, the last job's for
    # the upsampler it has not reached.
    (one_image([["prior", 4, 1, 1, 4, 2.0, 0.5], ["decoder", 10, 1, 1, 4, 1.0, 0.25]]), 0.0, LAST, 1, 3.5, 3.0 / 6.5),
    # Vary inverts first, then decodes: the decoding not started yet is counted.
    (one_image([["invert", 10, 1, 1, 4, 2.0, 0.5]]), 0.1, VARY, 1, 8.9, 2.1 / 11),
    # Mix runs the prior once per text: a second prior where the last job had one.
    (one_image([["prior", 4, 1, 1, 4, 4.0, 1.0], ["prior", 4, 1, 1, 2, 2.0, 1.0]]), 0.0, LAST[:3], 1, 9.0, 6.0 / 15),
    # Cold first steps are not the pace: 3 upsampler steps at 1 s are left (the old page, which averaged the 4 s first step
    # in, said 7.5 s), ...
    (LONG1[:2] + one_image([["upsampler", 5, 1, 1, 2, 5.0, 4.0]]), 0.0, LONG1, 1, 3.0, 31.5 / 34.5),
    # ... and in the second of four batches, after a job like it: 15 decoder steps at 0.5, this batch's upsampler with a
    # warm first step as the last job's last one (1.2 + 4), two whole batches as this one (2 x 25.5): exactly what is left
    # (the old page: 82.4 s) ...
    (IN_BATCH_2, 0.0, LONG4, 4, 63.7, 47.3 / 111),
    # ... and without one: each later upsampler run is taken to start as cold as the only one seen (3 x 2.8 s too many).
    (IN_BATCH_2, 0.0, None, 4, 72.1, 47.3 / 119.4),
    # Ten images, halfway through the first batch's decoder: 5 steps of 8 images (10 s), then a batch of 2 (4 + 5 s); the
    # old page counted the second batch as a whole one: 46 s, as this one does when it is not told the image count.
    (TEN[:1] + [["decoder", 10, 1, 2, 5, 10.0, 2.0, 8]], 0.0, TEN, 10, 19.0, 26 / 45),
    (TEN[:1] + [["decoder", 10, 1, 2, 5, 10.0, 2.0, 8]], 0.0, TEN, None, 46.0, 26 / 72),
]


@pytest.mark.parametrize("segments, since, last, n, left, fraction", ESTIMATES)
def test_time_left_covers_the_whole_job_from_measured_step_times(page_at, segments, since, last, n, left, fraction):
    got = page_at.evaluate("([segments, since, last, n]) => estimate({segments, since_tick: since}, last, n)", [segments, since, last, n])
    assert got["left"] == (None if left is None else pytest.approx(left)), got
    assert got["fraction"] == (None if fraction is None else pytest.approx(fraction)), got
    assert got["atLeast"] is False, got


AT_LEAST = [  # where what follows is unknown: (segments, since, last, n) -> seconds left at least
    # Two steps into the first job's prior (1 s a step): its 2 steps left, less the quarter step under way, and the second
    # batch's prior at that pace: 1.75 + 4 (the page used to say "estimating…" to the end).
    (one_image([["prior", 4, 1, 2, 2, 2.0, 1.0]]), 0.25, None, None, 5.75),
    # A newcomer's first job, 8 images at best quality on a fresh server, at decoder step 46/50: 4 steps of 8 images at
    # 0.125 s an image (the page said "estimating…" here).
    ([["prior", 25, 1, 1, 25, 12.0, 1.2, 8], ["decoder", 50, 1, 1, 46, 47.0, 2.0, 8]], 0.0, None, 8, 4.0),
    # A stage the last job did not run: the rest of it.
    (one_image([["prior", 4, 1, 1, 4, 2.0, 0.5], ["decoder 2", 10, 1, 1, 4, 1.0, 0.25]]), 0.0, LAST, 1, 1.5),
    # Vary's inversion with no job like it before: the decoding after it is unknown.
    (one_image([["invert", 10, 1, 1, 4, 2.0, 0.5]]), 0.1, None, 1, 2.9),
]


@pytest.mark.parametrize("segments, since, last, n, left", AT_LEAST)
def test_time_left_is_at_least_the_rest_of_what_this_job_has_run(page_at, segments, since, last, n, left):
    got = page_at.evaluate("([segments, since, last, n]) => estimate({segments, since_tick: since}, last, n)", [segments, since, last, n])
    assert got == {"left": pytest.approx(left), "fraction": None, "atLeast": True}, got


LEFT_TEXTS = [  # (segments, since, last, n) -> what the time-left line says
    (one_image([["prior", 4, 1, 2, 1, 1.0, 1.0]]), 0.25, None, None, "· estimating time left…"),  # nothing has a pace yet
    (one_image([["prior", 4, 1, 2, 2, 2.0, 1.0]]), 0.25, None, None, "· at least 6 s left"),
    (one_image([["prior", 4, 1, 2, 2, 2.0, 1.0]]), 0.5, LAST, 2, "· about 20 s left"),
    # A newcomer's first job of 4 images on a fresh server at decoder step 46/50 (0.05 s an image a step): 0.8 s of timed
    # steps left and the upsamplers not timed; then an upsampler's first step. The page went back to "estimating…" here.
    ([["prior", 25, 1, 1, 25, 3.0, 0.2, 4], ["decoder", 50, 1, 1, 46, 9.2, 0.2, 4]], 0.0, None, 4, "· the rest is not timed yet"),
    ([["prior", 25, 1, 1, 25, 3.0, 0.2, 4], ["decoder", 50, 1, 1, 50, 10.0, 0.2, 4], ["upsampler 1", 4, 1, 1, 1, 0.3, 0.3, 4]], 0.1,
     None, 4, "· the rest is not timed yet"),
    # A newcomer's first job of 8 images, 1.6 s in: at least 2.1 s is no news of the whole job (it said "at least 1 s left").
    ([["prior", 25, 1, 1, 3, 1.5, 1.3, 8]], 0.1, None, 8, "· the rest is not timed yet"),
]


@pytest.mark.parametrize("segments, since, last, n, text", LEFT_TEXTS)
def test_the_time_left_line_goes_back_to_estimating_only_before_any_pace(page_at, segments, since, last, n, text):
    got = page_at.evaluate("([segments, since, last, n]) => leftText(estimate({segments, since_tick: since}, last, n), segments)",
                           [segments, since, last, n])
    assert got == text


@pytest.mark.parametrize("width", [1200, 390])
def test_the_progress_line_keeps_the_step_count_whole(page_at, width):
    """The progress line's step count is never broken ("decoder step / 2/50" in a newcomer's left column): the time left
    and Stop go below it where both do not fit, at desktop and phone widths."""
    page_at.set_viewport_size({"width": width, "height": 900})
    texts = [("prior step 27/32", "· the rest is not timed yet"), ("decoder step 2/50 · batch 1/2", "· at least 12 s left")]
    for step, left in texts:
        lines = page_at.evaluate("""([step, left]) => {
            $("#progress").hidden = false;
            $("#progress-text").textContent = step;
            $("#progress-time").textContent = "12 s";
            $("#progress-left").textContent = left;
            const r = document.createRange(); r.selectNodeContents($("#progress-text"));
            const line = $("#progress .line").getBoundingClientRect(), stop = $("#stop").getBoundingClientRect();
            const got = [r.getClientRects().length, stop.right <= line.right + 0.5];
            $("#progress").hidden = true;
            return got;
        }""", [step, left])
        assert lines == [1, True], (width, step, lines)
    page_at.set_viewport_size({"width": 1280, "height": 720})  # Playwright's default, as the module's other tests had it


class TimedEngine:
    """The tiny engine after a prior of 40 steps, 0.2 s each, that waits at step 5 until the test opens the gate."""

    def __init__(self, engine):
        self.engine, self.gate, self.waiting = engine, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def run(self, request, callback=None):
        for step in range(1, 41):
            if step <= 5:
                time.sleep(0.2)
            callback(Tick("prior", step, 40, size=1))
            while step == 5 and not self.gate.wait(0.05):
                self.waiting.set()
                callback()
        return self.engine.run(request, callback)


def test_a_fresh_browser_gets_the_time_left_from_the_servers_last_job(browser, tiny_engine):
    """A first job on a fresh server says at least the rest of its own stage; a job like it sent from another browser
    profile (no storage) afterwards gets the whole estimate from the step times the server measured."""
    engine = TimedEngine(tiny_engine)
    with running(create_app(engine, Settings(steps=STEPS))) as (url, _):
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as c:
            assert c.get("/v1/unclip/timing", params={"op": "generate"}).json()["segments"] is None
            assert c.get("/v1/unclip/timing", params={"op": "paint"}).status_code == 400
            assert c.get("/v1/unclip/timing", params={"op": "generate", "quality": "ultra"}).status_code == 400
        texts = []
        for profile in range(2):
            page, problems = watched_page(browser)  # a new context each time: a fresh profile, nothing stored
            page.goto(url + "/")
            page.fill("#gen-n", "1")
            page.fill("#gen-prompt", "a red circle")
            engine.gate.clear()
            engine.waiting.clear()  # the last job is over: nothing sets it again
            page.click("#gen-go")
            assert engine.waiting.wait(30)
            sync_api.expect(page.locator("#progress-text")).to_contain_text("prior step 5/40")
            left = page.locator("#progress-left")
            sync_api.expect(left).to_contain_text("at least" if profile == 0 else "about", timeout=10_000)
            texts.append(left.text_content())
            engine.gate.set()
            sync_api.expect(page.locator(".run[data-op=generate] .card")).to_have_count(1, timeout=60_000)
            if profile == 1:  # another job sent as soon as the answer is in: its line is its own, never the last job's
                page.evaluate("""() => { window.lines = []; new MutationObserver(() => lines.push($("#progress-text").textContent))
                                         .observe($("#progress-text"), { childList: true, characterData: true, subtree: true }); }""")
                engine.gate.clear()
                engine.waiting.clear()
                page.click("#gen-go")
                assert engine.waiting.wait(30)
                sync_api.expect(page.locator("#progress-text")).to_contain_text("prior step 5/40")
                page.wait_for_timeout(1000)  # the last job's poll came every 400 ms, and said "starting…" of it
                lines = page.evaluate("lines")
                assert "starting…" not in lines[lines.index("prior step 5/40"):], lines
                engine.gate.set()
                sync_api.expect(page.locator(".run[data-op=generate] .card")).to_have_count(2, timeout=60_000)
            assert not [k for k in page.evaluate("Object.keys(localStorage)") if "timing" in k]
            assert not problems, problems
            page.close()
        assert re.fullmatch(r"· at least \d+ s left", texts[0]) and re.fullmatch(r"· about \d+ s left", texts[1]), texts
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as c:
            kept = c.get("/v1/unclip/timing", params={"op": "generate", "quality": "standard", "n": "1"}).json()
        assert kept["quality"] == "default" and kept["n"] == 1 and kept["segments"][0][:5] == ["prior", 40, 1, 1, 40], kept


@pytest.fixture(scope="module")
def page_at(browser, tiny_engine):
    """One page on a server, for tests of the page's own functions."""
    with running(create_app(tiny_engine, Settings(steps=STEPS))) as (url, _):
        page = browser.new_page()
        page.goto(url + "/")
        yield page
        page.close()


def test_warnings_shown_as_text_with_the_run_and_kept(browser, tiny_engine):
    """A generate whose prompt is cut (the engine's own warning), then a vary whose answer carries a warning written as
    HTML (put in by the test): each is shown as text with its run, and kept across a reload."""
    with running(create_app(tiny_engine, Settings(steps=STEPS))) as (url, _):
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        problems = []
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(url + "/")
        page.fill("#gen-n", "1")
        page.fill("#gen-seed", "3")
        page.fill("#gen-prompt", " ".join(["word"] * 40))
        page.click("#gen-go")
        made = page.locator(".run[data-op=generate]")
        sync_api.expect(made.locator(".card")).to_have_count(1, timeout=60_000)
        sync_api.expect(made.locator(".warnings")).to_contain_text("truncated")
        lines = made.locator(".warnings li").all_text_contents()
        assert lines and all(line.startswith("Warning: ") for line in lines), lines

        hostile = '<img src=x onerror="window.pwned = 1"> is far from the emoji this model knows'

        def with_warning(route):
            res = route.fetch()
            route.fulfill(response=res, headers={**res.headers, "x-unclip-warnings": json.dumps([hostile])})

        page.route("**/v1/images/variations", with_warning)
        page.get_by_role("button", name=re.compile(r"^Vary .*-3-0\.png$")).click()
        sync_api.expect(page.locator("#vary-file-name")).to_have_text(re.compile(r"loaded: word-word-[a-z0-9-]+-3-0\.png"))
        page.fill("#vary-n", "1")
        page.click("#vary-go")
        varied = page.locator(".run[data-op=vary]")
        sync_api.expect(varied.locator(".card")).to_have_count(1, timeout=60_000)
        sync_api.expect(varied.locator(".warnings li")).to_have_text("Warning: " + hostile)
        assert varied.locator(".warnings img").count() == 0 and page.evaluate("window.pwned") is None

        page.reload()
        sync_api.expect(page.locator(".run[data-op=vary] .warnings li")).to_have_text("Warning: " + hostile)
        sync_api.expect(page.locator(".run[data-op=generate] .warnings li")).to_contain_text("truncated")
        assert not problems, problems
        page.close()


def test_work_in_progress_survives_a_reload(browser, tiny_engine):
    """The tab, prompts, options, the image sent to Edit and its painted mask come back after a reload, and the edit
    runs from them at the quality chosen; the server keeps the job's step times for the next estimate; Clear history forgets it
    all."""
    with running(create_app(tiny_engine, Settings(steps=STEPS))) as (url, _):
        page, problems = watched_page(browser)
        page.goto(url + "/")
        assert page.get_attribute("#gen-prompt", "placeholder") == "e.g. cat face"
        for op in ("gen", "vary", "blend", "edit", "nudge", "mix", "compose"):  # every operation has the same quality choice
            assert page.locator(f"#{op}-quality option").evaluate_all("os => os.map(o => o.value)") == ["low", "standard", "high"]
        page.fill("#gen-n", "1")
        page.fill("#gen-seed", "9")
        page.fill("#gen-prompt", "cat face")
        page.select_option("#gen-quality", "low")
        page.click("#gen-go")
        sync_api.expect(page.locator(".run[data-op=generate] .card")).to_have_count(1, timeout=60_000)
        timing = page.evaluate("fetch('/v1/unclip/timing?op=generate&quality=low&n=1').then((r) => r.json())")  # kept by the server
        assert timing["quality"] == "fast" and timing["n"] == 1 and [s[0] for s in timing["segments"]][:2] == ["prior", "decoder"]

        page.get_by_role("button", name=re.compile(r"^Edit .*-9-0\.png$")).click()
        sync_api.expect(page.locator("#stage")).to_have_attribute("data-ready", "1")
        sync_api.expect(page.locator("#edit-file-name")).to_have_text(re.compile(r"loaded: cat-face-tiny-[a-z0-9-]*fast[a-z0-9-]*-9-0\.png"))
        box = page.locator("#edit-mask").bounding_box()
        page.mouse.move(box["x"] + 0.2 * box["width"], box["y"] + 0.3 * box["height"])
        page.mouse.down()
        page.mouse.move(box["x"] + 0.6 * box["width"], box["y"] + 0.5 * box["height"], steps=5)
        page.mouse.up()
        sync_api.expect(page.locator("#stage")).to_have_attribute("data-kept", "1")
        painted = mask_alpha(page)
        assert painted > 0
        page.fill("#edit-prompt", "red heart")
        page.fill("#edit-n", "1")
        page.select_option("#edit-quality", "high")
        page.locator("#edit-feather").fill("5")

        page.reload()
        sync_api.expect(page.locator("#p-edit")).to_be_visible()
        assert page.get_attribute("#tab-edit", "aria-selected") == "true"
        sync_api.expect(page.locator("#stage")).to_have_attribute("data-ready", "1")
        assert mask_alpha(page) == painted
        sync_api.expect(page.locator("#edit-file-name")).to_have_text(re.compile(r"loaded: cat-face-tiny-[a-z0-9-]*fast[a-z0-9-]*-9-0\.png"))
        assert page.input_value("#edit-prompt") == "red heart" and page.input_value("#edit-quality") == "high"
        assert page.locator("#edit-feather-out").text_content() == "5" and page.input_value("#edit-n") == "1"
        assert page.input_value("#gen-prompt") == "cat face" and page.input_value("#gen-quality") == "low"
        assert page.locator("#work-note").text_content() == ""
        page.click("#edit-go")
        edited = page.locator(".run[data-op=edit] .card")
        sync_api.expect(edited).to_have_count(1, timeout=60_000)
        recipe = edited.locator(".recipe").text_content()
        assert "quality best" in recipe and "feather 5" in recipe and "prompt red heart" in recipe, recipe

        # The mask's thumbnail shows where it repainted (red) and what it kept (white), not a black square.
        shot = np.asarray(decoded(page.locator(".run[data-op=edit] .maskbox").screenshot()).convert("RGB")).astype(int)
        red = (shot[..., 0] > 200) & (shot[..., 1] < 120) & (shot[..., 2] < 120)
        white = (shot > 230).all(-1)
        assert red.mean() > 0.02 and white.mean() > 0.2, (red.mean(), white.mean())

        page.click("#history-clear")
        page.reload()
        sync_api.expect(page.locator("#p-generate")).to_be_visible()
        assert page.input_value("#gen-prompt") == "" and page.input_value("#gen-quality") == "standard"
        assert page.get_attribute("#stage", "data-ready") is None and page.locator("#edit-file-name").text_content() == "no image yet"
        assert not problems, problems
        page.close()


def recipe_png(colour, recipe: dict) -> str:
    """A small PNG carrying `recipe` as unclip writes it (the `unclip` text chunk), in base64."""
    from PIL.PngImagePlugin import PngInfo

    info, buf = PngInfo(), io.BytesIO()
    info.add_text("unclip", json.dumps(recipe))
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode()


def test_a_blend_plays_its_frames_and_recipes_show_what_applied(page_at):
    """A blend's run shows its frames in turn (a click pauses them), each image is named as the server named it, and a
    recipe lists the sampler of the stages that ran only (a vary's recipe also names the prior's)."""
    recipe = {"op": "blend", "seed": 4, "steps": {"decoder": 40, "upsampler": 4}, "guidance": 3, "prior_guidance": 4,
              "sampler": {"decoder": "ddim", "prior": "dpmpp_2m", "upsampler": "ddim from t=400"}}
    images = [recipe_png(c, {**recipe, "frame": i}) for i, c in enumerate(["red", "green", "blue"])]
    names = ["a-b-blend-4-0.png", "a-b-blend-4-1.png", "../bad\\name.png"]
    page_at.evaluate("([images, names]) => addRun({op: 'blend', title: 'a → b', seconds: 1, mask: null, images, names})", [images, names])
    try:
        run = page_at.locator(".run[data-op=blend]")
        assert run.locator(".card a[download]").evaluate_all("els => els.map((e) => e.download)") == [*names[:2], "unclip-blend-4-2.png"]
        anim = run.locator(".anim")
        for frame in ("1", "2", "0"):
            sync_api.expect(anim).to_have_attribute("data-frame", frame, timeout=10_000)
        anim.get_by_role("button", name="Pause the animation").click()
        paused = anim.get_attribute("data-frame")
        page_at.wait_for_timeout(500)
        assert anim.get_attribute("data-frame") == paused and anim.locator(".meta").text_content().startswith(f"frame {int(paused) + 1}/3")
        shown = run.locator(".recipe").first.text_content()
        assert "sampler decoder ddim, upsampler ddim from t=400" in shown and "prior" not in shown, shown
    finally:
        page_at.evaluate("document.querySelectorAll('.run').forEach((r) => r.remove())")


def test_mix_texts_and_compose_boxes_survive_a_reload(page_at):
    page = page_at
    page.evaluate("localStorage.clear()")
    page.reload()
    page.get_by_role("tab", name="Mix").click()
    page.click("#mix-add-text")
    page.get_by_label("Text 1", exact=True).fill("red heart")
    page.locator("#mix-parts li:nth-child(1) input[type=number]").fill("0.5")
    page.get_by_role("tab", name="Compose").click()
    # The sentence's objects are previewed on the canvas as it is typed (where the server's parser puts them), until a box is drawn.
    page.fill("#compose-prompt", "cat face left of red heart")
    sync_api.expect(page.locator("#layout-canvas")).to_have_attribute("data-preview", "cat face | red heart")
    canvas = page.locator("#layout-canvas").bounding_box()
    page.mouse.move(canvas["x"] + 0.1 * canvas["width"], canvas["y"] + 0.2 * canvas["height"])
    page.mouse.down()
    page.mouse.move(canvas["x"] + 0.5 * canvas["width"], canvas["y"] + 0.6 * canvas["height"], steps=4)
    page.mouse.up()
    sync_api.expect(page.locator("#layout-canvas")).to_have_attribute("data-preview", "")
    page.keyboard.type("red apple")
    page.select_option("#compose-quality", "high")
    box = page.get_by_label("Object 1's box: left, top, right, bottom (fractions)").input_value()

    page.reload()
    sync_api.expect(page.locator("#p-compose")).to_be_visible()
    assert page.get_by_label("Object 1: what to draw in its box").input_value() == "red apple"
    assert page.get_by_label("Object 1's box: left, top, right, bottom (fractions)").input_value() == box
    assert page.input_value("#compose-quality") == "high"
    assert page.get_by_label("Text 1", exact=True).input_value() == "red heart"
    assert page.locator("#mix-parts li:nth-child(1) input[type=number]").input_value() == "0.5"
    page.evaluate("localStorage.clear()")


def test_a_jobs_warnings_show_while_it_runs(browser, tiny_engine):
    """A warning the server knows before the first step (a cut prompt) is on the page while the job runs, then with the
    run's images; the progress area's copy goes with the job."""
    engine = HeldAtFirstStep(tiny_engine)
    with running(create_app(engine, Settings(steps=STEPS))) as (url, _):
        page, problems = watched_page(browser, fresh_at=url)
        page.fill("#gen-n", "1")
        page.fill("#gen-prompt", " ".join(["apple"] * 200))
        page.click("#gen-go")
        assert engine.started.wait(30)
        sync_api.expect(page.locator("#job-warnings li")).to_have_count(1)
        sync_api.expect(page.locator("#job-warnings li")).to_contain_text("Warning: prompt truncated to ")
        assert page.locator(".run").count() == 0
        engine.gate.set()
        sync_api.expect(page.locator(".run[data-op=generate] .warnings li")).to_contain_text("Warning: prompt truncated to ", timeout=60_000)
        sync_api.expect(page.locator("#job-warnings")).to_be_hidden()
        assert problems == []
        page.evaluate("localStorage.clear()")


def test_a_reload_while_a_job_runs_follows_it_to_its_answer(browser, tiny_engine):
    """The page notes the job it sent; reloaded while the job runs, it shows the job's progress again and its images when
    done (the server ran it on and kept the answer). A job the server does not know (restarted) is said once; Stop
    stops the job on the server too."""
    engine = HeldEngine(tiny_engine)
    with running(create_app(engine, Settings(steps=STEPS))) as (url, _):
        page, problems = watched_page(browser, fresh_at=url)
        send_generate(page, "a red circle", n=1, seed=4)
        assert engine.started.wait(30)
        sync_api.expect(page.locator("#progress-text")).to_contain_text("decoder step 1/2")
        job = page.evaluate("JSON.parse(localStorage.getItem('unclip-jobs-v1'))")[0]

        page.reload()
        sync_api.expect(page.locator("#progress")).to_be_visible()
        sync_api.expect(page.locator("#progress-text")).to_contain_text("decoder step 1/2")
        assert page.locator("#gen-go").is_disabled() and page.locator(".run").count() == 0
        engine.gate.set()
        made = page.locator(".run[data-op=generate] .card")
        sync_api.expect(made).to_have_count(1, timeout=60_000)
        sync_api.expect(made.locator(".meta")).to_contain_text("seed 4")
        assert page.locator(".run[data-op=generate] h2").text_content().startswith("generatea red circle")
        sync_api.expect(page.locator("#progress")).to_be_hidden()
        assert page.evaluate("localStorage.getItem('unclip-jobs-v1')") is None and page.locator("#error").text_content() == ""
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as c:  # the kept answer was fetched, so forgotten
            assert c.get(f"/v1/unclip/jobs/{job['id']}").json()["status"] == "unknown"
        page.reload()  # and it is in the history like any other run
        sync_api.expect(page.locator(".run[data-op=generate] .card")).to_have_count(1)

        # A job noted before the server was restarted: said once, then forgotten.
        page.evaluate("""(job) => localStorage.setItem('unclip-jobs-v1', JSON.stringify([{...job, id: 'page-gone-0123456789abcdef',
                                                                                         title: 'a lost star'}]))""", job)
        page.reload()
        sync_api.expect(page.locator("#error")).to_have_text(
            "The server no longer knows the job “a lost star” sent before the reload (it was restarted): run it again.")
        sync_api.expect(page.locator("#progress")).to_be_hidden()
        page.reload()
        sync_api.expect(page.locator(".run[data-op=generate] .card")).to_have_count(1)
        assert page.locator("#error").text_content() == ""

        # Stop: the server stops the job (a reload would not).
        engine.gate.clear()
        engine.started.clear()
        page.click("#gen-go")
        assert engine.started.wait(30)
        sync_api.expect(page.locator("#progress-text")).to_contain_text("decoder step 1/2")
        page.click("#stop")
        sync_api.expect(page.locator("#error")).to_have_text("Stopped.")  # at once; the server stops the job as the page asks
        assert engine.stopped.wait(30) and engine.reasons == ["stopped"]
        assert page.evaluate("localStorage.getItem('unclip-jobs-v1')") is None
        assert not problems, problems
        page.close()


def paint(page, y0: float, y1: float) -> None:
    box = page.locator("#edit-mask").bounding_box()
    page.mouse.move(box["x"] + 0.2 * box["width"], box["y"] + y0 * box["height"])
    page.mouse.down()
    page.mouse.move(box["x"] + 0.6 * box["width"], box["y"] + y1 * box["height"], steps=5)
    page.mouse.up()
    sync_api.expect(page.locator("#stage")).to_have_attribute("data-kept", "1")


def test_undo_and_redo_survive_a_reload(browser, tiny_engine, tmp_path):
    """The brush's undo and redo steps are kept with the mask; a full browser storage keeps the newest steps that fit;
    Clear history forgets them."""
    source = tmp_path / "face.png"
    Image.new("RGB", (64, 48), (250, 200, 40)).save(source)
    with running(create_app(tiny_engine, Settings(steps=STEPS))) as (url, _):
        page, problems = watched_page(browser, fresh_at=url)
        page.get_by_role("tab", name="Edit").click()
        page.set_input_files("#edit-file", str(source))
        sync_api.expect(page.locator("#stage")).to_have_attribute("data-ready", "1")
        sizes = []
        for y in (0.2, 0.5, 0.8):
            paint(page, y, y)
            sizes.append(mask_alpha(page))
        assert 0 < sizes[0] < sizes[1] < sizes[2]
        page.click("#mask-undo")
        sync_api.expect(page.locator("#stage")).to_have_attribute("data-kept", "1")

        page.reload()
        sync_api.expect(page.locator("#stage")).to_have_attribute("data-ready", "1")
        assert mask_alpha(page) == sizes[1]
        sync_api.expect(page.locator("#mask-undo")).to_be_enabled()
        sync_api.expect(page.locator("#mask-redo")).to_be_enabled()
        page.click("#mask-redo")
        assert mask_alpha(page) == sizes[2]
        for want in (sizes[1], sizes[0], 0):
            page.click("#mask-undo")
            assert mask_alpha(page) == want
        assert page.locator("#mask-undo").is_disabled()
        sync_api.expect(page.locator("#stage")).to_have_attribute("data-kept", "1")
        page.reload()
        sync_api.expect(page.locator("#stage")).to_have_attribute("data-ready", "1")
        assert mask_alpha(page) == 0 and page.locator("#mask-undo").is_disabled()
        for want in sizes:  # three steps to redo, after a second reload
            sync_api.expect(page.locator("#mask-redo")).to_be_enabled()
            page.click("#mask-redo")
            assert mask_alpha(page) == want

        # A browser storage too full for more than one step: the newest is kept, the mask and the page go on.
        page.evaluate("""() => {
            const set = Storage.prototype.setItem;
            Storage.prototype.setItem = function (key, value) {
                if (key === "unclip-mask-undo-v1" && JSON.parse(value).done.length > 1) throw new DOMException("full", "QuotaExceededError");
                return set.call(this, key, value);
            };
        }""")
        page.click("#brush-clear")
        sync_api.expect(page.locator("#stage")).to_have_attribute("data-kept", "1")
        page.reload()
        sync_api.expect(page.locator("#stage")).to_have_attribute("data-ready", "1")
        assert mask_alpha(page) == 0
        page.click("#mask-undo")
        assert mask_alpha(page) == sizes[2]
        assert page.locator("#mask-undo").is_disabled()  # the older steps did not fit

        page.click("#history-clear")
        page.reload()
        assert page.evaluate("localStorage.getItem('unclip-mask-undo-v1')") is None
        assert page.locator("#edit-file-name").text_content() == "no image yet"
        assert not problems, problems
        page.close()


def test_the_concept_note_leads_to_the_pages_concept_search(browser, tiny_weights, tmp_path):
    """A prompt that names no concept: the warning names no command the page lacks; its button opens the page's search
    of what the model was trained on, nearest to the prompt first, and a concept found becomes the prompt."""
    from test_concepts import tiny_set

    from unclip_cli.engine import Engine

    engine = Engine.load(tiny_set(tiny_weights, tmp_path, note=True), device="cpu")
    with running(create_app(engine, Settings(steps=STEPS))) as (url, _):
        page, problems = watched_page(browser, fresh_at=url)
        page.fill("#gen-n", "1")
        page.fill("#gen-prompt", "a sleeping cat")
        page.click("#gen-go")
        warning = page.locator(".run[data-op=generate] .warnings li")
        sync_api.expect(warning).to_have_count(1, timeout=60_000)
        assert warning.text_content() == ("Warning: the prompt is not the name of a concept this model was trained on, so expect a "
                                          "loose match; the closest are cat, cat face (search the concepts)")
        sync_api.expect(page.locator("#concepts")).not_to_have_attribute("open", "")
        warning.get_by_role("button", name="search the concepts").click()
        sync_api.expect(page.locator("#concept-note")).to_have_text("None is named “a sleeping cat”; the nearest by shared words:")
        assert page.input_value("#concept-q") == "a sleeping cat"
        assert page.locator("#concept-list button").all_text_contents() == ["🐈 cat · 猫", "🐱 cat face · 猫脸"]
        page.locator("#concept-list button", has_text="cat face").click()
        assert page.input_value("#gen-prompt") == "cat face"

        # The search button's accessible name is its text (a closed <details>' innerText is "" in Chromium: the trial read none).
        sync_api.expect(page.locator("#concept-form").get_by_role("button", name="Search", exact=True)).to_be_visible()
        page.fill("#concept-q", "heart")
        page.press("#concept-q", "Enter")
        sync_api.expect(page.locator("#concept-note")).to_have_text("1 match “heart”:")
        page.fill("#concept-q", "12345")
        page.press("#concept-q", "Enter")
        sync_api.expect(page.locator("#concept-note")).to_contain_text("None is named “12345” or close in meaning (it has no words)")
        sync_api.expect(page.locator("#concept-list button")).to_have_count(3)
        page.reload()  # a warning kept in the history gets its button too
        sync_api.expect(page.locator(".run[data-op=generate] .warnings button")).to_have_text("search the concepts")
        page.locator("#concepts summary").click()  # opened by hand: what the model knows
        sync_api.expect(page.locator("#concept-note")).to_have_text("3 concepts; the first 3:")
        sync_api.expect(page.locator("#concept-list button")).to_have_count(3)
        assert not problems, problems
        page.close()


@pytest.mark.parametrize("level", [None, "info"])
def test_console_is_quiet_by_default_and_never_logs_progress_polls(tiny_weights, level):
    import queue
    import signal
    import subprocess
    import sys
    import threading

    import httpx

    cmd = [sys.executable, "-m", "unclip_cli", "serve", "--weights", str(tiny_weights), "--port", "0", "--device", "cpu"]
    proc = subprocess.Popen(cmd + (["--log-level", level] if level else []), stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True)
    reader.start()  # a thread, not select(): the line we wait for may already sit in the reader's buffer
    try:
        url, seen = None, []
        while url is None:
            line = lines.get(timeout=120)
            seen.append(line)
            if line.startswith("Serving on "):
                url = line.split()[2].rstrip("/")
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as c:
            assert c.get("/v1/models").status_code == 200
            for _ in range(3):
                c.get("/v1/unclip/jobs/page-1-2")  # what the page polls while a job runs
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    console = "".join(seen) + "".join(iter(lambda: lines.get_nowait() if not lines.empty() else None, None))
    assert "/v1/unclip/jobs/" not in console, console
    assert ("GET /v1/models" in console) == (level == "info"), console


def test_mix_from_history_and_compose_boxes_replay_with_from(browser, tiny_engine, tiny_weights, tmp_path):
    """Two results mixed with a text and weights, then two boxes drawn with the mouse and composed: each PNG the
    page shows reruns to the same pixels with `unclip mix/compose --from` (the images the page mixed saved as it
    names them)."""
    from clirun import cli

    with running(create_app(tiny_engine, Settings(steps=STEPS))) as (url, _):
        page, problems = watched_page(browser, fresh_at=url)
        send_generate(page, "a red circle", n=2, seed=5)
        sync_api.expect(page.locator(".run[data-op=generate] .card")).to_have_count(2, timeout=60_000)
        names = page.locator(".run[data-op=generate] .card a[download]").evaluate_all("els => els.map((e) => e.download)")
        assert names[0].startswith("a-red-circle-") and names[0].endswith("-5-0.png") and names[1] == names[0][:-5] + "1.png", names
        sources = {}
        for seed in (5, 6):
            page.get_by_role("button", name=f"Mix {names[seed - 5]}", exact=True).click()
            sources[seed] = blob_bytes(page, f".run[data-op=generate] .card:nth-child({seed - 4}) img")
        sync_api.expect(page.locator("#p-mix")).to_be_visible()
        page.click("#mix-add-text")
        page.get_by_label("Text 3", exact=True).fill("a green star")
        for i, w in ((1, "0.5"), (2, "-0.25"), (3, "0.75")):
            page.locator(f"#mix-parts li:nth-child({i}) input[type=number]").fill(w)
        page.fill("#mix-n", "1")
        page.fill("#mix-seed", "7")
        page.click("#mix-go")
        mixed = page.locator(".run[data-op=mix] .card")
        sync_api.expect(mixed).to_have_count(1, timeout=60_000)
        recipe = mixed.locator(".recipe").text_content()
        assert "weights 0.5, -0.25, 0.75" in recipe and "prompts a green star" in recipe, recipe
        assert f"inputs {names[0]}, {names[1]}" in recipe, recipe  # the files' names, as the CLI's
        title = page.locator(".run[data-op=mix] h2").text_content()
        assert f"0.5 × {names[0]} + -0.25 × {names[1]} + 0.75 × “a green star”" in title, title

        page.get_by_role("tab", name="Compose").click()
        canvas = page.locator("#layout-canvas").bounding_box()
        for x0, x1, phrase in ((0.05, 0.45, "a red circle"), (0.55, 0.95, "a star")):
            page.mouse.move(canvas["x"] + x0 * canvas["width"], canvas["y"] + 0.25 * canvas["height"])
            page.mouse.down()
            page.mouse.move(canvas["x"] + x1 * canvas["width"], canvas["y"] + 0.75 * canvas["height"], steps=6)
            page.mouse.up()
            page.keyboard.type(phrase)  # the new box's phrase field has the focus
        page.get_by_label("Object 2's box: left, top, right, bottom (fractions)").fill("0.5, 0.2, 1, 0.8")
        page.get_by_label("Object 2's box: left, top, right, bottom (fractions)").dispatch_event("change")
        page.fill("#compose-background", "a white page")
        page.select_option("#compose-method", "paste")
        page.fill("#compose-n", "1")
        page.fill("#compose-seed", "3")
        page.click("#compose-go")
        composed = page.locator(".run[data-op=compose] .card")
        sync_api.expect(composed).to_have_count(1, timeout=60_000)
        recipe = composed.locator(".recipe").text_content()
        assert "a star [0.5, 0.2, 1, 0.8]" in recipe and "method paste" in recipe and "background a white page" in recipe, recipe
        first = recipe.split("objects a red circle [")[1].split("]")[0]
        l, t, r, b = map(float, first.split(", "))
        assert abs(l - 0.05) < 0.02 and abs(t - 0.25) < 0.02 and abs(r - 0.45) < 0.02 and abs(b - 0.75) < 0.02, first

        # Rerun both from the PNGs the page shows, with the CLI.
        for name, data in zip(names, sources.values()):
            (tmp_path / name).write_bytes(data)
        for op, inputs in (("mix", [tmp_path / names[0], tmp_path / names[1]]), ("compose", [])):
            made = tmp_path / f"{op}.png"
            made.write_bytes(blob_bytes(page, f".run[data-op={op}] .card img"))
            again = cli(op, *inputs, "--from", made, "--weights", tiny_weights, "--out", tmp_path / "again")
            assert again.code == 0, again.err
            rerun = Image.open(again.out.strip().splitlines()[0]).convert("RGB")
            assert np.array_equal(np.asarray(rerun), np.asarray(decoded(made.read_bytes()).convert("RGB"))), op

        # Errors stay on the page: a box with no phrase.
        page.mouse.move(canvas["x"] + 0.3 * canvas["width"], canvas["y"] + 0.05 * canvas["height"])
        page.mouse.down()
        page.mouse.move(canvas["x"] + 0.6 * canvas["width"], canvas["y"] + 0.2 * canvas["height"], steps=3)
        page.mouse.up()
        page.click("#compose-go")
        sync_api.expect(page.locator("#error")).to_have_text("Say what to draw in box 3.")
        assert not problems, problems
        page.close()


def test_a_large_photo_is_scaled_down_for_every_tool_and_named_in_its_warning(browser, tiny_weights, tmp_path):
    """A photo over the server's pixel limit (which stays, for API clients) loads in every tool that takes an image,
    scaled down in the browser to 1024 px on its longer side, its shape kept, and varies and edits without error; the
    warning that it is far from the emoji names the file; every tool has a seed field."""
    from unclip_cli.engine import Engine

    weights = tmp_path / "set"
    shutil.copytree(tiny_weights, weights)
    shutil.copy(os.path.join(os.path.dirname(__file__), "..", "weights", "emoji", "domain.json"), weights)
    engine = Engine.load(weights, device="cpu")
    photo = tmp_path / "big photo.jpg"
    y, x = np.mgrid[0:1700, 0:3000]
    Image.fromarray(np.stack([x * 255 // 3000, y * 255 // 1700, np.full_like(x, 128)], -1).astype(np.uint8)).save(photo, quality=90)
    with running(create_app(engine, Settings(steps=STEPS, max_pixels=2000 * 2000))) as (url, _):
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as c:  # as sent, the server refuses it
            r = c.post("/v1/images/variations", files={"image": ("big photo.jpg", photo.read_bytes())})
            assert r.status_code == 400 and "3000x1700" in r.json()["error"]["message"]
        page, problems = watched_page(browser)
        page.goto(url + "/")
        for tab, field in [("Vary", "vary-file"), ("Blend", "blend-a-file"), ("Blend", "blend-b-file"), ("Nudge", "nudge-file"),
                           ("Edit", "edit-file")]:
            page.get_by_role("tab", name=tab).click()
            page.set_input_files("#" + field, str(photo))
            sync_api.expect(page.locator(f"#{field}-name")).to_have_text("loaded: big photo.jpg (3000×1700, sent as 1024×580)")
        sync_api.expect(page.locator("#stage")).to_have_attribute("data-ready", "1")
        assert page.evaluate("[maskCanvas.width, maskCanvas.height]") == [1024, 580]
        # Each tool says at once that the photo is far from the emoji (the server's own test), not when its job starts.
        for field in ("vary-file", "blend-a-file", "blend-b-file", "nudge-file", "edit-file"):
            sync_api.expect(page.locator(f"#{field}-warnings li")).to_have_text(
                "Warning: big photo.jpg is far from the emoji this model knows: expect abstract results")
        page.get_by_role("tab", name="Mix").click()
        page.set_input_files("#mix-file", str(photo))
        sync_api.expect(page.locator("#mix-parts li")).to_have_count(1)
        assert page.evaluate("createImageBitmap(mixParts[0].blob).then((b) => [b.width, b.height])") == [1024, 580]
        for prefix in ("gen", "vary", "blend", "edit", "nudge", "mix", "compose"):
            assert page.locator(f"#p-{'generate' if prefix == 'gen' else prefix} #{prefix}-seed").count() == 1, prefix

        page.get_by_role("tab", name="Vary").click()
        page.fill("#vary-n", "1")
        page.fill("#vary-seed", "7")
        page.click("#vary-go")
        varied = page.locator(".run[data-op=vary]")
        sync_api.expect(varied.locator(".card")).to_have_count(1, timeout=60_000)
        sync_api.expect(varied.locator(".meta")).to_contain_text("seed 7")
        sync_api.expect(varied.locator(".warnings li")).to_have_text(
            "Warning: big photo.jpg is far from the emoji this model knows: expect abstract results")
        assert page.locator("#error").text_content() == ""

        page.get_by_role("tab", name="Edit").click()
        paint(page, 0.3, 0.6)
        page.fill("#edit-prompt", "a red heart")
        page.fill("#edit-n", "1")
        page.fill("#edit-seed", "9")
        page.click("#edit-go")
        edited = page.locator(".run[data-op=edit] .card")
        sync_api.expect(edited).to_have_count(1, timeout=60_000)
        sync_api.expect(edited.locator(".meta")).to_contain_text("seed 9")
        assert decoded(blob_bytes(page, ".run[data-op=edit] .card img")).size == (1024, 580)
        assert not problems, problems
        page.close()


def test_phone_header_on_one_line_and_no_canvas_readback_warning(browser, tiny_engine, tmp_path):
    """At phone width the header keeps to one line; painting and undoing (a readback each) draw no warning from Chrome
    about reading a canvas back often (the mask's context says it will)."""
    source = tmp_path / "face.png"
    Image.new("RGB", (64, 48), (250, 200, 40)).save(source)
    with running(create_app(tiny_engine, Settings(steps=STEPS))) as (url, _):
        page = browser.new_page(viewport={"width": 390, "height": 844})
        said = []
        page.on("console", lambda m: said.append(m.text))
        page.goto(url + "/")
        sync_api.expect(page.locator("#model")).to_contain_text(tiny_engine.name)
        rows = [page.locator(sel).bounding_box() for sel in ("header h1", "#model", "header .api")]
        middles = [b["y"] + b["height"] / 2 for b in rows]
        assert max(middles) - min(middles) < 6 and all(b["height"] < 30 for b in rows[1:]), rows
        sync_api.expect(page.locator("#p-generate .keys")).to_be_hidden()  # no Ctrl or Esc on a phone
        page.get_by_role("tab", name="Edit").click()
        page.set_input_files("#edit-file", str(source))
        sync_api.expect(page.locator("#stage")).to_have_attribute("data-ready", "1")
        for y in (0.2, 0.4, 0.6, 0.8):
            paint(page, y, y)
        for _ in range(3):
            page.click("#mask-undo")
        sync_api.expect(page.locator("#stage")).to_have_attribute("data-kept", "1")
        assert not [t for t in said if "willReadFrequently" in t], said
        page.close()
