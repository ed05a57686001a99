"""Collect screenshots, text documents, charts and diagrams offline, for the out-of-domain image test (issue 24: a
screenshot of a web page passed it without a warning). Two batches, each split alternately by name into a fit half
and a held-out half (as scripts/collect_photos.py splits the photographs), as PNGs under OUT/fit and OUT/held-out:

- pages: HTML and text files already on a Debian machine with Node.js, Valgrind, the Rust toolchain and this repo,
  rendered by headless Chromium (Debian's `chromium`, as tests/test_page.py drives it) at desktop, laptop and phone
  window sizes, a few in Chromium's forced dark mode; man pages as plain text (`man`, 100 columns);
- drawn: charts (bars, lines, scatter, pie), text documents, tables, box-and-arrow diagrams, terminals, code
  editors, slides and dialog boxes drawn with PIL in DejaVu and Liberation fonts, from a fixed seed.

    python scripts/collect_screens.py --out ~/.cache/unclip/screens

Nothing is fetched; scripts/calibrate_domain_images.py --screens OUT reads the folders. The list of sources is
PAGES and MANPAGES below (a missing file is an error, so the set is the same on every machine that has them).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
RUST = next(iter(sorted(Path.home().glob(".rustup/toolchains/stable-*/share/doc/rust/html"))), Path("/nonexistent"))
NODE, VALGRIND = Path("/usr/share/doc/nodejs/api"), Path("/usr/share/doc/valgrind/html")
# (name, file, window size, dark): desktop 1280x800 and 1920x1080, laptop 1366x768, tablet 800x1000, phone 390x844
PAGES = [
    ("node-fs", NODE / "fs.html", (1280, 800), False), ("node-http", NODE / "http.html", (1920, 1080), False),
    ("node-buffer", NODE / "buffer.html", (1366, 768), False), ("node-crypto", NODE / "crypto.html", (390, 844), False),
    ("node-stream", NODE / "stream.html", (800, 1000), True), ("node-events", NODE / "events.html", (1280, 800), True),
    ("node-path", NODE / "path.html", (1920, 1080), False), ("node-url", NODE / "url.html", (390, 844), False),
    ("node-child-process", NODE / "child_process.html", (1366, 768), False), ("node-net", NODE / "net.html", (1280, 800), False),
    ("node-index", NODE / "index.html", (1280, 800), False), ("node-os", NODE / "os.html", (800, 1000), False),
    ("valgrind-index", VALGRIND / "index.html", (1280, 800), False), ("valgrind-manual-core", VALGRIND / "manual-core.html", (1366, 768), False),
    ("valgrind-mc", VALGRIND / "mc-manual.html", (1920, 1080), False), ("valgrind-faq", VALGRIND / "faq.html", (390, 844), False),
    ("valgrind-quick-start", VALGRIND / "quick-start.html", (800, 1000), True), ("valgrind-cg", VALGRIND / "cg-manual.html", (1280, 800), False),
    ("valgrind-licenses", VALGRIND / "license.gpl.html", (1366, 768), False), ("valgrind-dist-news", VALGRIND / "dist.news.html", (1280, 800), False),
    ("rust-index", RUST / "index.html", (1280, 800), False), ("rust-std", RUST / "std/index.html", (1920, 1080), False),
    ("rust-vec", RUST / "std/vec/struct.Vec.html", (1366, 768), False), ("rust-book-toc", RUST / "book/index.html", (1280, 800), False),
    ("rust-book-ch01", RUST / "book/ch01-01-installation.html", (390, 844), False),
    ("rust-book-ch04", RUST / "book/ch04-01-what-is-ownership.html", (1920, 1080), True),
    ("rust-error-index", RUST / "error-index.html", (800, 1000), False), ("rust-reference", RUST / "reference/introduction.html", (1366, 768), False),
    ("rust-option", RUST / "std/option/enum.Option.html", (1280, 800), True), ("rust-cargo", RUST / "cargo/index.html", (1920, 1080), False),
    ("libtasn1", Path("/usr/share/gtk-doc/html/libtasn1/libtasn1-libtasn1.html"), (1280, 800), False),
    ("libtasn1-index", Path("/usr/share/gtk-doc/html/libtasn1/api-index-full.html"), (1366, 768), False),
    ("python3-policy", Path("/usr/share/doc/python3/python-policy.html"), (1280, 800), False),
    ("unclip-readme", REPO / "README.md", (1280, 800), False), ("unclip-changelog", REPO / "CHANGELOG.md", (1920, 1080), False),
    ("unclip-page", REPO / "unclip_cli/serve/page.html", (1366, 768), False), ("unclip-page-phone", REPO / "unclip_cli/serve/page.html", (390, 844), False),
    ("unclip-model-card", REPO / "weights/emoji/MODEL_CARD.md", (800, 1000), False),
]
MANPAGES = [("man-ls", "ls", (1280, 800)), ("man-bash", "bash", (1366, 768)), ("man-git", "git", (1920, 1080)),
            ("man-python3", "python3", (800, 1000)), ("man-tar", "tar", (1280, 800)), ("man-grep", "grep", (390, 844))]
FONTS = Path("/usr/share/fonts/truetype")
SANS, SERIF, MONO = (FONTS / "dejavu/DejaVuSans.ttf", FONTS / "liberation/LiberationSerif-Regular.ttf", FONTS / "dejavu/DejaVuSansMono.ttf")
WORDS = ("the model image prompt seed step noise sample decoder prior upsampler emoji text vector embedding scale "
         "guidance train loss batch value result table figure chart report quarter sales revenue total mean error "
         "server request response page file data record user account date amount status open close").split()


def chromium() -> str:
    for cand in (os.environ.get("UNCLIP_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser")):
        if cand and os.access(cand, os.X_OK):
            return cand
    sys.exit("no Chromium: apt-get install chromium (or set UNCLIP_CHROMIUM)")


def screenshot(exe: str, url: str, size: tuple[int, int], dark: bool, out: Path) -> Image.Image:
    args = [exe, "--headless", "--disable-gpu", "--no-proxy-server", "--hide-scrollbars", f"--screenshot={out}",
            f"--window-size={size[0]},{size[1]}"]
    args += ["--no-sandbox"] if os.geteuid() == 0 else []
    args += ["--blink-settings=forceDarkModeEnabled=true"] if dark else []
    subprocess.run(args + [url], capture_output=True, timeout=60, check=True)
    im = Image.open(out).convert("RGB")
    return im


def sentence(rng, n: int) -> str:
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n))


def palette(rng, k: int) -> list[tuple[int, int, int]]:
    base = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (23, 190, 207)]
    return [base[i] for i in rng.permutation(len(base))[:k]]


def chart(rng, kind: str, size) -> Image.Image:
    w, h = size
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    f = ImageFont.truetype(str(SANS), max(12, h // 40))
    d.text((w // 2 - w // 6, h // 30), f"{sentence(rng, 3).title()} ({2020 + int(rng.integers(0, 6))})", fill="black", font=f)
    x0, y0, x1, y1 = w // 10, h // 8, w - w // 20, h - h // 8
    if kind == "pie":
        shares = rng.dirichlet(np.ones(int(rng.integers(3, 7))))
        r = min(x1 - x0, y1 - y0) // 2
        cx, cy, start = (x0 + x1) // 2 - w // 10, (y0 + y1) // 2, 0.0
        for k, (s, c) in enumerate(zip(shares, palette(rng, len(shares)))):
            d.pieslice((cx - r, cy - r, cx + r, cy + r), start, start + 360 * s, fill=c, outline="white")
            d.rectangle((cx + r + 30, cy - r + 30 * k, cx + r + 46, cy - r + 30 * k + 16), fill=c)
            d.text((cx + r + 54, cy - r + 30 * k), f"{WORDS[int(rng.integers(0, len(WORDS)))]} {s:.0%}", fill="black", font=f)
            start += 360 * s
        return im
    for k in range(6):  # grid, ticks and labels
        y = y1 - (y1 - y0) * k // 5
        d.line((x0, y, x1, y), fill=(220, 220, 220))
        d.text((x0 - w // 18, y - 8), str(20 * k), fill="black", font=f)
    d.line((x0, y0, x0, y1), fill="black", width=2)
    d.line((x0, y1, x1, y1), fill="black", width=2)
    series = palette(rng, int(rng.integers(1, 4)))
    n = int(rng.integers(5, 14))
    for s, c in enumerate(series):
        v = np.clip(np.cumsum(rng.normal(0, 10, n)) + rng.uniform(30, 70), 2, 98)
        xs = x0 + (np.arange(n) + 0.5) * (x1 - x0) / n
        ys = y1 - v * (y1 - y0) / 100
        if kind == "bars":
            bw = (x1 - x0) / n / (len(series) + 1)
            for x, y in zip(xs, ys):
                d.rectangle((x - bw * len(series) / 2 + s * bw, y, x - bw * len(series) / 2 + (s + 1) * bw - 1, y1), fill=c)
        elif kind == "lines":
            d.line(list(zip(xs, ys)), fill=c, width=3)
            for x, y in zip(xs, ys):
                d.ellipse((x - 4, y - 4, x + 4, y + 4), fill=c)
        else:  # scatter
            for _ in range(int(rng.integers(40, 200))):
                x, y = rng.uniform(x0 + 5, x1 - 5), rng.uniform(y0 + 5, y1 - 5)
                d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=c)
    for k in range(n):
        d.text((x0 + (k + 0.3) * (x1 - x0) / n, y1 + 6), f"Q{k % 4 + 1}", fill="black", font=f)
    return im


def document(rng, kind: str, size) -> Image.Image:
    w, h = size
    dark = kind in ("terminal", "editor")
    im = Image.new("RGB", size, (30, 30, 30) if dark else "white")
    d = ImageDraw.Draw(im)
    px = int(rng.integers(13, 20))
    f = ImageFont.truetype(str(MONO if dark or kind == "table" else (SERIF if rng.random() < 0.5 else SANS)), px)
    if kind == "text":  # a page of paragraphs
        y, margin = h // 12, w // 8
        big = ImageFont.truetype(str(SANS), px * 2)
        d.text((margin, y), sentence(rng, 4).title(), fill="black", font=big)
        y += px * 4
        while y < h - px * 3:
            for _ in range(int(rng.integers(3, 8))):
                line = sentence(rng, 40)
                while d.textlength(line, font=f) > w - 2 * margin:
                    line = line.rsplit(" ", 1)[0]
                d.text((margin, y), line, fill=(20, 20, 20), font=f)
                y += int(px * 1.5)
            y += px
    elif kind == "table":  # a spreadsheet
        cw, rh = int(rng.integers(90, 160)), px + 10
        for r in range(h // rh + 1):
            if r == 0:
                d.rectangle((0, 0, w, rh), fill=(230, 236, 245))
            for c in range(w // cw + 1):
                d.rectangle((c * cw, r * rh, (c + 1) * cw, (r + 1) * rh), outline=(200, 200, 200))
                text = WORDS[int(rng.integers(0, len(WORDS)))] if r == 0 or c == 0 else f"{rng.uniform(0, 10_000):,.2f}"
                d.text((c * cw + 4, r * rh + 4), text, fill="black", font=f)
    elif kind == "diagram":  # boxes and arrows
        boxes = []
        for r in range(int(rng.integers(2, 5))):
            for c in range(int(rng.integers(2, 4))):
                x, y = w * (c + 0.5) / 3.2 + rng.uniform(-20, 20), h * (r + 0.6) / 4.5
                boxes.append((x, y))
                fill = tuple(int(v) for v in rng.integers(200, 256, 3))
                d.rounded_rectangle((x - 90, y - 30, x + 90, y + 30), 8, fill=fill, outline="black", width=2)
                d.text((x - 70, y - 10), sentence(rng, 2), fill="black", font=f)
        for a, b in zip(boxes, boxes[1:]):
            d.line((a[0], a[1] + 30, b[0], b[1] - 30), fill="black", width=2)
            d.polygon([(b[0], b[1] - 30), (b[0] - 6, b[1] - 42), (b[0] + 6, b[1] - 42)], fill="black")
    elif kind in ("terminal", "editor"):
        y, colours = 8, [(220, 220, 220), (106, 153, 85), (86, 156, 214), (206, 145, 120), (197, 134, 192)]
        if kind == "editor":
            d.rectangle((0, 0, w // 6, h), fill=(37, 37, 38))
            for k in range(h // (px + 6)):
                d.text((8, 8 + k * (px + 6)), f"{WORDS[k % len(WORDS)]}.py", fill=(180, 180, 180), font=f)
        x0 = w // 6 + 10 if kind == "editor" else 8
        while y < h - px:
            indent = int(rng.integers(0, 4)) * 4 * px // 2 if kind == "editor" else 0
            x = x0 + indent
            for word in sentence(rng, int(rng.integers(1, 9))).split():
                c = colours[int(rng.integers(0, len(colours)))] if kind == "editor" else ((80, 250, 120) if x == x0 else colours[0])
                d.text((x, y), word, fill=c, font=f)
                x += d.textlength(word + " ", font=f)
            y += px + 6
    elif kind == "slide":
        top = tuple(int(v) for v in rng.integers(0, 160, 3))
        d.rectangle((0, 0, w, h // 6), fill=top)
        d.text((w // 12, h // 20), sentence(rng, 4).title(), fill="white", font=ImageFont.truetype(str(SANS), px * 2))
        for k in range(int(rng.integers(3, 7))):
            y = h // 4 + k * px * 3
            d.ellipse((w // 12, y + px // 3, w // 12 + px // 2, y + px // 3 + px // 2), fill=top)
            d.text((w // 12 + px, y), sentence(rng, int(rng.integers(4, 9))), fill="black", font=f)
    else:  # a dialog box over a grey desktop
        im.paste((90, 100, 110), (0, 0, w, h))
        bx0, by0, bx1, by1 = w // 5, h // 5, w - w // 5, h - h // 5
        d.rectangle((bx0, by0, bx1, by1), fill=(246, 246, 246), outline=(120, 120, 120))
        d.rectangle((bx0, by0, bx1, by0 + px * 2), fill=(225, 225, 225))
        d.text((bx0 + 10, by0 + px // 2), sentence(rng, 3).title(), fill="black", font=f)
        for k in range(int(rng.integers(2, 5))):
            y = by0 + px * 4 + k * px * 3
            d.text((bx0 + 20, y), WORDS[int(rng.integers(0, len(WORDS)))] + ":", fill="black", font=f)
            d.rectangle((bx0 + (bx1 - bx0) // 3, y - 4, bx1 - 20, y + px + 4), fill="white", outline=(150, 150, 150))
        for k, label in enumerate(("Cancel", "OK")):
            x = bx1 - 20 - (2 - k) * 110
            d.rounded_rectangle((x, by1 - px * 3, x + 100, by1 - px), 5, fill=(0, 120, 215) if label == "OK" else (230, 230, 230))
            d.text((x + 25, by1 - px * 3 + 5), label, fill="white" if label == "OK" else "black", font=f)
    return im


DRAWN = [(kind, k) for k in range(3) for kind in ("bars", "lines", "scatter", "pie", "text", "table", "diagram", "terminal",
                                                   "editor", "slide", "dialog")]
SIZES = [(1280, 800), (1024, 768), (800, 1000), (1920, 1080), (600, 600)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path.home() / ".cache" / "unclip" / "screens")
    args = ap.parse_args(argv)
    exe = chromium()
    pages, drawn = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path, size, dark in PAGES:
            if not path.is_file():
                sys.exit(f"missing {path}: install the package that ships it (nodejs, valgrind, a Rust toolchain's docs)")
            pages[name] = screenshot(exe, path.as_uri(), size, dark, Path(tmp) / f"{name}.png")
        for name, page, size in MANPAGES:
            text = subprocess.run(["man", page], capture_output=True, text=True, check=True,
                                  env={**os.environ, "MANWIDTH": "100", "MAN_KEEP_FORMATTING": "0", "MANPAGER": "cat"}).stdout
            txt = Path(tmp) / f"{name}.txt"
            txt.write_text("".join(c for c in text if c.isprintable() or c == "\n"), encoding="utf-8")
            pages[name] = screenshot(exe, txt.as_uri(), size, False, Path(tmp) / f"{name}.png")
    rng = np.random.default_rng(0)
    for i, (kind, k) in enumerate(DRAWN):
        size = SIZES[i % len(SIZES)]
        draw = chart if kind in ("bars", "lines", "scatter", "pie") else document
        drawn[f"drawn-{kind}-{k}"] = draw(rng, kind, size)
    for batch in (pages, drawn):
        for k, name in enumerate(sorted(batch)):
            folder = args.out / ("fit" if k % 2 == 0 else "held-out")
            folder.mkdir(parents=True, exist_ok=True)
            batch[name].save(folder / f"{name}.png")
    print({p.name: len(list(p.glob("*.png"))) for p in sorted(args.out.iterdir())}, file=sys.stderr)


if __name__ == "__main__":
    main()
