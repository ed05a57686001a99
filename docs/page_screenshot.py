"""Make the README's picture of the page at `/`: the real server on the shipped weights, driven in a headless
Chromium as a person would use it (generate, send a result to the editor, paint, edit).

    .venv/bin/python docs/page_screenshot.py [--weights weights/emoji] [--chromium /usr/bin/chromium]

Writes docs/server-page.png. Needs the serve extra, Playwright and a Chromium (apt-get install chromium).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=str(HERE.parent / "weights" / "emoji"))
    ap.add_argument("--chromium", default=os.environ.get("UNCLIP_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument("--out", default=str(HERE / "server-page.png"))
    args = ap.parse_args()
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")

    from playwright.sync_api import expect, sync_playwright

    from unclip_cli.engine import Engine
    from unclip_cli.serve.app import Settings, create_app
    from unclip_cli.serve.server import running

    engine = Engine.load(args.weights, device="cpu")
    browser_args = ["--no-proxy-server"] + (["--no-sandbox"] if os.geteuid() == 0 else [])
    with running(create_app(engine, Settings())) as (url, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=browser_args)
        page = browser.new_page(viewport={"width": 1180, "height": 820}, device_scale_factor=1)
        page.goto(url + "/")
        expect(page.locator("#model")).to_contain_text(engine.name)

        page.fill("#gen-prompt", "cat face")
        page.fill("#gen-seed", "0")
        page.select_option("#gen-quality", "standard")
        page.click("#gen-go")
        cards = page.locator(".run[data-op=generate] .card")
        expect(cards).to_have_count(4, timeout=300_000)

        cards.nth(1).locator(".acts button", has_text="Edit").click()  # its aria-label names the image
        expect(page.locator("#stage")).to_have_attribute("data-ready", "1")
        box = page.locator("#edit-mask").bounding_box()
        at = lambda fx, fy: (box["x"] + fx * box["width"], box["y"] + fy * box["height"])  # noqa: E731
        page.fill("#brush-size", "70")
        page.mouse.move(*at(0.3, 0.22))
        page.mouse.down()
        page.mouse.move(*at(0.7, 0.22), steps=12)
        page.mouse.up()
        page.fill("#edit-prompt", "cat face with a red hat")
        page.fill("#edit-n", "2")
        page.fill("#brush-size", "40")
        page.click("#edit-go")
        expect(page.locator(".run[data-op=edit] .card")).to_have_count(2, timeout=300_000)
        page.mouse.move(*at(0.5, 0.22))  # the brush cursor over the painted stroke
        page.locator(".run[data-op=edit] details").first.evaluate("d => d.open = true")
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=args.out)
        browser.close()
    print(args.out)


if __name__ == "__main__":
    main()
