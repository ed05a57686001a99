"""Make the README gallery from the shipped weights: real output of the real commands.

    .venv/bin/python docs/gallery.py [--weights weights/emoji]

Writes docs/gallery/*.png and docs/GALLERY.md (each picture with the command that made it). Inputs for
vary, blend, edit and nudge are images generated in the same run, so nothing outside the repo is needed.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
OUT = HERE / "gallery"
PROMPTS = ["cat face", "red heart", "pizza", "rocket", "猫脸", "红心", "披萨", "火箭"]
SEED = 0


def run(args: list[str], weights: str) -> list[Path]:
    cmd = [sys.executable, "-m", "unclip_cli", *args, "--weights", weights, "--out", str(OUT), "--quiet", "--force"]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return [Path(line) for line in done.stdout.split()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=str(HERE.parent / "weights" / "emoji"))
    weights = ap.parse_args().weights
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    rows = []

    def show(title: str, args: list[str], pick) -> Path:
        paths = run(args, weights)
        shown = pick(paths)
        rows.append(f"### {title}\n\n`unclip {' '.join(shlex.quote(a) for a in args)}`\n\n![{title}](gallery/{shown.name})\n")
        return shown

    def grid(paths):
        return next(p for p in paths if p.name.endswith("-grid.png"))

    firsts = {}
    for prompt in PROMPTS:
        shown = show(f"generate: {prompt}", ["generate", prompt, "-n", "4", "--seed", str(SEED)], grid)
        firsts[prompt] = next(p for p in OUT.glob(f"{shown.name.replace('-grid.png', '')}-0.png"))
    cat, pizza = firsts["cat face"], firsts["pizza"]
    show("vary", ["vary", str(cat.relative_to(HERE.parent)), "-n", "4", "--seed", str(SEED)], grid)
    show("blend", ["blend", str(cat.relative_to(HERE.parent)), str(pizza.relative_to(HERE.parent)), "--steps", "5", "--seed", str(SEED)],
         lambda ps: next(p for p in ps if p.name.endswith("-strip.png")))
    mask = OUT / "mask-lower-half.png"
    size = Image.open(cat).size
    m = Image.new("L", size, 0)
    m.paste(255, (0, size[1] // 2, size[0], size[1]))
    m.save(mask)
    show("edit (lower half repainted)", ["edit", str(cat.relative_to(HERE.parent)), "--mask", str(mask.relative_to(HERE.parent)), "red heart", "-n", "4", "--seed", str(SEED)], grid)
    show("nudge", ["nudge", str(cat.relative_to(HERE.parent)), "--to", "dog face", "--from", "cat face", "--amount", "0.5", "-n", "4", "--seed", str(SEED)], grid)
    rows.append(stages_compared(weights, {p: firsts[p] for p in ("cat face", "pizza", "rocket")}))
    keep = {cat, pizza, mask, *(OUT / line.split("](gallery/")[1].rstrip(")") for row in rows for line in row.splitlines()
                                 if "](gallery/" in line)}
    for p in OUT.iterdir():  # only what the page shows and the inputs its commands name
        if p not in keep:
            p.unlink()
    (HERE / "GALLERY.md").write_text(
        "# Gallery\n\nReal output of the shipped `weights/emoji` model, made by `docs/gallery.py` "
        "(rerun it to reproduce; same seeds, same pictures on the same device).\n\n" + "\n".join(rows)
    )
    print(HERE / "GALLERY.md")


def stages_compared(weights: str, images: dict[str, Path]) -> str:
    """The same images as the set's last upsampler stage makes them, beside what the stages before it give
    (enlarged by the viewer, bicubic): a crop of each at full size. `images`: prompt -> image 0 of its
    `generate -n 4 --seed SEED`, made again by the set without its last stage file."""
    import tempfile

    from unclip_cli.modelset import upsampler_files

    last = upsampler_files(Path(weights))[-1]
    if last.name == "upsampler.safetensors":  # one stage: nothing to compare
        return ""
    with tempfile.TemporaryDirectory() as tmp:
        fewer = Path(tmp) / "fewer"
        fewer.mkdir()
        for f in Path(weights).iterdir():
            if f.is_file() and f != last:
                (fewer / f.name).symlink_to(f.resolve())
        before = []
        for prompt in images:
            cmd = [sys.executable, "-m", "unclip_cli", "generate", prompt, "-n", "4", "--seed", str(SEED),
                   "--weights", str(fewer), "--out", str(Path(tmp) / "out"), "--quiet", "--force"]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            before.append(Image.open(done.stdout.split()[0]).convert("RGB"))  # image 0, as `images` holds
        after = [Image.open(p).convert("RGB") for p in images.values()]
        size = after[0].size[0]
        half = size // 2
        sheet = Image.new("RGB", (2 * half * len(images), 2 * half), "white")
        for k, (b, a) in enumerate(zip(before, after)):
            b = b.resize((size, size), Image.Resampling.BICUBIC)
            box = (half // 2, half // 2, half // 2 + half, half // 2 + half)  # the centre quarter, at full size
            sheet.paste(b.resize((half, half), Image.Resampling.LANCZOS), (2 * half * k, 0))
            sheet.paste(b.crop(box), (2 * half * k, half))
            sheet.paste(a.crop(box), (2 * half * k + half, half))
            sheet.paste(a.resize((half, half), Image.Resampling.LANCZOS), (2 * half * k + half, 0))
    name = "stages-compared.png"
    sheet.save(OUT / name)
    shown = f"{before[0].size[0]} px" if before else ""
    return (f"### {Path(weights).name}: {shown} output enlarged (left) and the {size} px stage (right)\n\n"
            f"Each image whole, reduced (top), and its centre at full size (bottom), from `generate -n 4 --seed {SEED}` "
            f"with and without `{last.name}`: {', '.join(p.stem for p in images.values())}.\n\n![stages compared](gallery/{name})\n")


if __name__ == "__main__":
    main()
