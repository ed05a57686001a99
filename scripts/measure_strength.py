"""How far `vary --strength` and `nudge --amount` move an image (issue 24, item 4), on held-out emoji, measured
with what the model set did not optimise: pixels and the independent concept classifier (weights/classifier).

    python scripts/measure_strength.py --op vary --values 0,0.1,0.2,0.3,0.4,0.5,0.7,1 [--n 12] [--quality fast]
    python scripts/measure_strength.py --op nudge --values 0.1,0.2,0.3,0.5 --to "tiger face"

The sources are the first --n tiles of tests/data/held-out-emoji.png (64 px, concepts in its ATTRIBUTION
file), one result per source and value, seed 0 for all. Per value it reports the mean over sources of: the
pixel RMSE to the source at 64 px (0-1 scale), the classifier feature distance (1 - cosine of the pooled
features), and how often the classifier still puts the source's concept in its top 5 ("recognisable").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def held_out(n: int) -> tuple[list[Image.Image], list[str]]:
    """The first n tiles of the held-out sheet and their concepts (from its ATTRIBUTION table)."""
    sheet = Image.open(REPO / "tests" / "data" / "held-out-emoji.png").convert("RGB")
    tiles = [sheet.crop((64 * (k % 10), 64 * (k // 10), 64 * (k % 10) + 64, 64 * (k // 10) + 64)) for k in range(n)]
    rows = re.findall(r"^\| (\d+) \| [^|]+ \| ([0-9A-F-]+) \|", (REPO / "tests" / "data" / "held-out-emoji.ATTRIBUTION.md").read_text(), re.M)
    concepts = dict((int(k), c) for k, c in rows)
    return tiles, [concepts[k] for k in range(n)]


class Yardstick:
    """The independent classifier: pooled features and top-5 concepts of images."""

    def __init__(self, path=REPO / "weights" / "classifier" / "emoji-concepts.safetensors"):
        from unclip_cli import checkpoint

        ck = checkpoint.load(path, "classifier")
        self.model, self.concepts = ck.model.float().eval(), ck.extra["concepts"]

    def __call__(self, images):
        import torch

        from unclip_cli.engine import to_tensor

        with torch.no_grad():
            x = torch.stack([to_tensor(im) for im in images])
            f = self.model.features(x)
            top5 = self.model.head(f).topk(5, dim=1).indices
        return torch.nn.functional.normalize(f, dim=1).numpy(), [[self.concepts[i] for i in row] for row in top5.tolist()]


def pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB").resize((64, 64), Image.Resampling.LANCZOS), dtype=np.float64) / 255


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=str(REPO / "weights" / "emoji"))
    ap.add_argument("--op", choices=("vary", "nudge"), default="vary")
    ap.add_argument("--values", default="0,0.1,0.2,0.3,0.4,0.5,0.7,1")
    ap.add_argument("--to", default="tiger face", help="nudge: the text to turn toward")
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--quality", default="fast")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--decoder-steps", type=int, default=None, help="override the quality's decoder steps")
    ap.add_argument("--precision", default=None, help="fp32 or bf16 (default: the machine's, as `unclip` picks it)")
    ap.add_argument("--sheet", default=None, help="write a contact sheet (sources, then one row per value) here")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch

    from unclip_cli.engine import Engine
    from unclip_cli.requests import NudgeRequest, VaryRequest

    t0 = time.time()
    engine = Engine.load(args.weights, device="cpu")
    judge = Yardstick()
    sources, concepts = held_out(args.n)
    src_feat, src_top5 = judge(sources)
    values = [float(v) for v in args.values.split(",")]
    rows, sheet_rows = {}, [sources]
    for v in values:
        if args.op == "vary":
            reqs = [VaryRequest(image=im, strength=v, seed=args.seed, quality=args.quality, decoder_steps=args.decoder_steps,
                                precision=args.precision) for im in sources]
        else:
            reqs = [NudgeRequest(image=im, to=args.to, amount=v, seed=args.seed, quality=args.quality,
                                 decoder_steps=args.decoder_steps, precision=args.precision) for im in sources]
        outs = [r.images[0] for r in engine.run_many(reqs, batch_size=len(reqs))]
        feat, top5 = judge(outs)
        rmse = [float(np.sqrt(((pixels(a) - pixels(b)) ** 2).mean())) for a, b in zip(sources, outs)]
        dist = 1 - (feat * src_feat).sum(1)
        rows[v] = {"pixel_rmse": float(np.mean(rmse)), "feature_distance": float(dist.mean()),
                   "recognisable_top5": float(np.mean([c in t for c, t in zip(concepts, top5)])),
                   "pixel_rmse_each": [round(x, 4) for x in rmse]}
        sheet_rows.append(outs)
        print(f"{args.op} {v:g}: rmse {rows[v]['pixel_rmse']:.4f}  feature distance {rows[v]['feature_distance']:.4f}  "
              f"recognisable {rows[v]['recognisable_top5']:.2f}  ({time.time() - t0:.0f} s)", file=sys.stderr)
    ordered = [rows[v]["feature_distance"] for v in values]
    report = {
        "op": args.op, "to": args.to if args.op == "nudge" else None, "n": args.n, "quality": args.quality, "decoder_steps": args.decoder_steps, "seed": args.seed,
        "precision": args.precision,
        "sources_recognisable_top5": float(np.mean([c in t for c, t in zip(concepts, src_top5)])),
        "by_value": {f"{v:g}": rows[v] for v in values},
        "feature_distance_monotone": bool(all(a <= b for a, b in zip(ordered, ordered[1:]))),
        "pixel_rmse_monotone": bool(all(rows[a]["pixel_rmse"] <= rows[b]["pixel_rmse"] for a, b in zip(values, values[1:]))),
        "seconds": round(time.time() - t0, 1), "threads": torch.get_num_threads(),
        "command": "python scripts/measure_strength.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if args.sheet:
        side = 64
        canvas = Image.new("RGB", (side * args.n, side * len(sheet_rows)), "white")
        for r, row in enumerate(sheet_rows):
            for c, im in enumerate(row):
                canvas.paste(im.convert("RGB").resize((side, side), Image.Resampling.LANCZOS), (c * side, r * side))
        canvas.save(args.sheet)


if __name__ == "__main__":
    main()
