"""Seam score of edits before and after feathering (issue 24, item 3), as `unclip eval`'s edit section makes
them: the centre square (half the side) of held-out emoji repainted from another concept's name.

    python scripts/measure_seams.py [--n 32] [--size 128] [--quality fast] [--out seams.json]

The held-out emoji are the 100 tiles of tests/data/held-out-emoji.png (64 px, resized to --size with
Lanczos, the eval corpus' size); the prompts are emoji names cycled over the edits. Each edit runs once with
--feather 0 (a hard paste: the whole mask is the generated image) and the feathered results are computed
from it with the engine's own weights (`engine.feather_weights`), which is what the engine does; the first
--check edits are also run through the engine with the feather (and without, in the same batch), and
must give identical pixels.
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


def feathered(hard: Image.Image, source: Image.Image, repaint: np.ndarray, feather: int) -> Image.Image:
    from unclip_cli.engine import feather_weights, paste_back

    return paste_back(hard, source, repaint, feather_weights(repaint, feather) if feather else None)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=str(REPO / "weights" / "emoji"))
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--quality", default="fast")
    ap.add_argument("--feathers", default="0,4,8,16")
    ap.add_argument("--check", type=int, default=2, help="edits also run through the engine with each feather")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch

    from unclip_cli.engine import Engine
    from unclip_cli.evaluate import SEAM_RADIUS, center_mask, pixels_changed_outside, seam_score
    from unclip_cli.requests import EditRequest

    t0 = time.time()
    engine = Engine.load(args.weights, device="cpu")
    tiles = held_out_tiles(args.size)[: args.n]
    repaint = center_mask(args.size)
    mask = Image.fromarray(repaint.astype(np.uint8) * 255, "L")
    feathers = [int(f) for f in args.feathers.split(",")]
    reqs = [EditRequest(image=im, mask=mask, prompt=PROMPTS[j % len(PROMPTS)], seed=1000 * j, quality=args.quality, feather=0)
            for j, im in enumerate(tiles)]
    hard = []
    for s in range(0, len(reqs), args.batch):
        hard += [r.images[0] for r in engine.run_many(reqs[s : s + args.batch], batch_size=args.batch)]
        print(f"{len(hard)}/{len(reqs)} edits, {time.time() - t0:.0f} s", file=sys.stderr)
    scores = {"source": [seam_score(im, repaint) for im in tiles]}
    checked = {}
    for f in feathers:
        outs = [feathered(h, im, repaint, f) for h, im in zip(hard, tiles)]
        assert all(pixels_changed_outside(np.asarray(a), np.asarray(b), repaint) == 0 for a, b in zip(tiles, outs))
        scores[f"feather {f}"] = [seam_score(o, repaint) for o in outs]
        if f and args.check:  # the engine's own feathered run equals the derived one (the same batch: same rounding)
            few = reqs[: args.check]
            hard_few = [r.images[0] for r in engine.run_many(few, batch_size=len(few))]
            again = [r.images[0] for r in engine.run_many([dataclass_replace(r, feather=f) for r in few], batch_size=len(few))]
            checked[f] = all(np.array_equal(np.asarray(a), np.asarray(feathered(h, im, repaint, f)))
                             for a, h, im in zip(again, hard_few, tiles))
        if f == 8:
            for j in range(min(4, len(outs))):
                Image.fromarray(np.concatenate([np.asarray(tiles[j]), np.asarray(hard[j]), np.asarray(outs[j])], axis=1)).save(
                    f"/tmp/seam-{j}.png")
    report = {
        "what": "seam score (gradient energy within %d px of the mask border / elsewhere) of centre-square edits" % SEAM_RADIUS,
        "n": len(tiles), "size": args.size, "quality": args.quality, "mask_fraction": float(repaint.mean()),
        "mean": {k: float(np.mean(v)) for k, v in scores.items()},
        "median": {k: float(np.median(v)) for k, v in scores.items()},
        "edits_where_feather_8_lowers_it": float(np.mean(np.array(scores.get("feather 8", scores["feather 0"])) < np.array(scores["feather 0"]))),
        "engine_run_identical_to_derived": checked,
        "seconds": round(time.time() - t0, 1), "threads": torch.get_num_threads(),
        "command": "python scripts/measure_seams.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


def dataclass_replace(req, **kw):
    import dataclasses

    return dataclasses.replace(req, **kw)


if __name__ == "__main__":
    main()
