"""Seam score of edits (issue 24, item 3): with a hard paste, feathered, and feathered with the colours matched to the
kept image along the border (`engine.harmonise`, the default since 2026-12-05).

    python scripts/measure_seams.py [--n 32] [--size 128] [--quality fast] [--out seams.json]
    python scripts/measure_seams.py --set user --n 12 --quality fast
    python scripts/measure_seams.py --set user --n 8 --masks ellipse,circle,blob,box --feathers 0,4,6,8 --scores

--set eval (the default) makes edits as `unclip eval`'s edit section does: the centre square (half the side) of the
held-out emoji of tests/data/held-out-emoji.png (64 px tiles, resized to --size with Lanczos), repainted from emoji
names cycled over the edits. --set user makes them as a user would at the model's 256 px: the model's own outputs
(--own, a folder of generated PNGs: scripts/make_domain_set.py's generated/) and held-out emoji of the corpus at 256 px
(--corpus, its val-000000.tar), alternately, with a rectangle (`--box 0.3,0.45,0.8,0.9`), a circle and a hand-drawn
blob with a soft edge, cycled (--masks: also the wide ellipse of a newcomer's edit, which the new object filled). Each edit is sampled once; the engine's generated square is kept (a wrapper around
`engine.paste_back`) and every variant is pasted from it with the engine's own functions; the first --check edits are
also run through the engine with its defaults, which must give the same pixels as the derived default.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPTS = ["red heart", "cat face", "pizza", "star", "sun", "dog face", "rocket", "smiling face with sunglasses",
           "red apple", "four leaf clover", "fire", "snowflake"]


def held_out_tiles(size: int | None = None) -> list[Image.Image]:
    sheet = Image.open(REPO / "tests" / "data" / "held-out-emoji.png").convert("RGB")
    tiles = [sheet.crop((64 * (k % 10), 64 * (k // 10), 64 * (k % 10) + 64, 64 * (k // 10) + 64)) for k in range(100)]
    return tiles if size is None else [t.resize((size, size), Image.Resampling.LANCZOS) for t in tiles]


def user_masks(size: int = 256, kinds: str = "box,circle,blob") -> list[Image.Image]:
    """A rectangle as --box makes it, a circle, a blob drawn with a soft brush (as a paint program saves it), and a
    wide ellipse at the top (a newcomer's edit of 2026-12-05, which the new object filled)."""
    from PIL import ImageDraw, ImageFilter

    from unclip_cli import imageio

    circle = Image.new("L", (size, size), 0)
    ImageDraw.Draw(circle).ellipse([round(v * size / 256) for v in (60, 50, 170, 160)], fill=255)
    rng = np.random.default_rng(5)
    pts = [(size * (0.5 + 0.27 * np.cos(a) * (1 + 0.25 * rng.standard_normal())), size * (0.59 + 0.21 * np.sin(a) * (1 + 0.25 * rng.standard_normal())))
           for a in np.linspace(0, 2 * np.pi, 13)[:-1]]
    blob = Image.new("L", (size, size), 0)
    ImageDraw.Draw(blob).polygon(pts, fill=255)
    ellipse = Image.new("L", (size, size), 0)
    ImageDraw.Draw(ellipse).ellipse([round(v * size / 256) for v in (64, 20, 192, 120)], fill=255)
    made = {"box": imageio.box_mask((0.3, 0.45, 0.8, 0.9), (size, size)), "circle": circle,
            "blob": blob.filter(ImageFilter.GaussianBlur(3)), "ellipse": ellipse}
    return [made[k] for k in kinds.split(",")]


def user_images(n: int, own: Path, corpus: Path) -> list[Image.Image]:
    import io
    import tarfile

    generated = sorted(own.glob("*.png"))
    with tarfile.open(corpus) as tf:
        members = [m for m in tf if m.name.endswith(".png")]
        held = [Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB") for m in members[:: max(1, len(members) // n)][: n // 2]]
    mine = [Image.open(generated[k]).convert("RGB") for k in range(0, len(generated), max(1, len(generated) // n))][: n - len(held)]
    return [im for pair in zip(mine, held) for im in pair] + mine[len(held):]


def variants(gen: Image.Image, source: Image.Image, repaint: np.ndarray, feathers: list[int], reach: int) -> dict:
    from unclip_cli.engine import paste_back

    out = {}
    for f in feathers:
        out[f"feather {f}"] = paste_back(gen, source, repaint, f)
        if f:
            out[f"feather {f}, harmonised"] = paste_back(gen, source, repaint, f, reach)
    return out


def prompt_scores(engine, crops: dict[str, list], prompts: list[str]) -> dict:
    """Each variant's mask crops (the mask's bounding box, as `unclip eval` crops): the sampling CLIP's cosine to the
    prompt, and the share whose prompt concept (by its English name) the independent classifier puts in its top 5."""
    sys.path.insert(0, str(REPO / "scripts"))
    from measure_strength import Yardstick

    from unclip_cli.domain import load_concepts
    from unclip_cli.engine import square
    from unclip_cli.evaluate import cosine_rows, embed_images, embed_texts

    code = {c["en"]: c["concept"] for c in load_concepts(REPO / "weights" / "emoji").entries}
    judge, z_t = Yardstick(), embed_texts(engine, prompts)
    clip, top5 = {}, {}
    for name, ims in crops.items():
        clip[name] = float(cosine_rows(embed_images(engine, ims), z_t).mean())
        top5[name] = float(np.mean([code.get(p) in t for p, t in zip(prompts, judge([square(im).resize((64, 64), Image.Resampling.LANCZOS) for im in ims])[1])]))
    return {"prompt_clip_in_mask": clip, "prompt_in_classifier_top5": top5,
            "prompts_with_a_concept": sum(p in code for p in prompts)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=str(REPO / "weights" / "emoji"))
    ap.add_argument("--set", choices=("eval", "user"), default="eval")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--size", type=int, default=128, help="--set eval: the edits' size")
    ap.add_argument("--own", default=str(Path.home() / ".cache" / "unclip" / "domain-set" / "generated"))
    ap.add_argument("--corpus", default=str(Path.home() / ".cache" / "unclip" / "emoji-256" / "val-000000.tar"))
    ap.add_argument("--quality", default="fast")
    ap.add_argument("--guidance", type=float, default=None, help="the decoder's guidance (default: the set's)")
    ap.add_argument("--feathers", default="0,8,16")
    ap.add_argument("--masks", default="box,circle,blob", help="--set user: the masks, cycled (box, circle, blob, ellipse)")
    ap.add_argument("--scores", action="store_true",
                    help="also each variant's prompt score in the mask: the sampling CLIP's cosine (as `unclip eval`) and "
                         "whether the independent classifier has the prompt's concept in its top 5")
    ap.add_argument("--check", type=int, default=2, help="edits also run through the engine with its defaults")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--save", default=None, help="a folder for each edit's source and variants")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import dataclasses

    import torch

    import unclip_cli.engine as engine_module
    from unclip_cli.engine import HARMONY_BASE_PX, Engine
    from unclip_cli.evaluate import SEAM_RADIUS, center_mask, mask_box, pixels_changed_outside, seam_score
    from unclip_cli.requests import EditRequest, default_feather

    t0 = time.time()
    engine = Engine.load(args.weights, device="cpu")
    if args.set == "eval":
        sources = held_out_tiles(args.size)[: args.n]
        masks = [Image.fromarray(center_mask(args.size).astype(np.uint8) * 255, "L")]
    else:
        sources, masks = user_images(args.n, Path(args.own), Path(args.corpus)), user_masks(kinds=args.masks)
    masks = [masks[j % len(masks)] for j in range(len(sources))]
    repaints = [np.asarray(m) >= 128 for m in masks]
    reach = round(HARMONY_BASE_PX * sources[0].size[0] / engine.base_size)
    feathers = [int(f) for f in args.feathers.split(",")]
    reqs = [EditRequest(image=im, mask=m, prompt=PROMPTS[j % len(PROMPTS)], seed=1000 * j, quality=args.quality, feather=0,
                        guidance=args.guidance)
            for j, (im, m) in enumerate(zip(sources, masks))]
    generated = []  # the engine's square results before pasting
    paste_back = engine_module.paste_back

    def keep(gen, *a, **kw):
        generated.append(gen)
        return paste_back(gen, *a, **kw)

    engine_module.paste_back = keep
    for s in range(0, len(reqs), args.batch):
        engine.run_many(reqs[s : s + args.batch], batch_size=args.batch)
        print(f"{len(generated)}/{len(reqs)} edits, {time.time() - t0:.0f} s", file=sys.stderr)
    # The engine's own default run equals the default derived from its generated squares.
    few = [dataclasses.replace(r, feather=None) for r in reqs[: args.check]]  # the default, scaled to the image
    again = [r.images[0] for r in engine.run_many(few, batch_size=len(few))] if few else []
    generated, again_gen = generated[: len(reqs)], generated[len(reqs) :]
    engine_module.paste_back = paste_back
    scores: dict[str, list] = {"source": [seam_score(im, r) for im, r in zip(sources, repaints)]}
    crops: dict[str, list] = {"source": [im.crop(mask_box(r)) for im, r in zip(sources, repaints)]}
    for j, (gen, im, rep) in enumerate(zip(generated, sources, repaints)):
        for name, out in variants(gen, im, rep, feathers, reach).items():
            assert pixels_changed_outside(np.asarray(im), np.asarray(out), rep) == 0
            scores.setdefault(name, []).append(seam_score(out, rep))
            crops.setdefault(name, []).append(out.crop(mask_box(rep)))
            if args.save:
                Path(args.save).mkdir(parents=True, exist_ok=True)
                out.save(Path(args.save) / f"{j:02d}-{name.replace(' ', '').replace(',', '-')}.png")
        if args.save:
            im.save(Path(args.save) / f"{j:02d}-source.png")
    px = default_feather(sources[0].size)
    default = f"feather {px}, harmonised"
    checked = all(np.array_equal(np.asarray(a), np.asarray(variants(g, im, rep, [px], reach)[default]))
                  for a, g, im, rep in zip(again, again_gen, sources, repaints))
    base = np.array(scores["feather 0"])
    report = {
        "what": "seam score (gradient energy within %d px of the mask border / elsewhere) of %s edits" % (
            SEAM_RADIUS, "centre-square" if args.set == "eval" else f"user-drawn ({args.masks.replace(',', ', ')})"),
        "set": args.set, "n": len(sources), "size": sources[0].size[0], "quality": args.quality, "guidance": args.guidance, "harmonise_reach_px": reach,
        "mean": {k: float(np.mean(v)) for k, v in scores.items()},
        "median": {k: float(np.median(v)) for k, v in scores.items()},
        "edits_lowered_from_feather_0": {k: float(np.mean(np.array(v) < base)) for k, v in scores.items() if k.startswith("feather ") and k != "feather 0"},
        "engine_default_identical_to_derived": checked if few else None,
        **(prompt_scores(engine, crops, [r.prompt for r in reqs]) if args.scores else {}),
        "seconds": round(time.time() - t0, 1), "threads": torch.get_num_threads(),
        "command": "python scripts/measure_seams.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
