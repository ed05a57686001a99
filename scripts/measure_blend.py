"""Blends before and after the unguided inversion (issue 24, item 4): on pairs of held-out emoji, how close each end
frame comes to its own image and whether the frames move steadily from A to B, measured with the independent
classifier (weights/classifier), which the model set did not optimise.

    python scripts/measure_blend.py --pairs 8 [--quality fast]

Pairs are tiles (2k, 2k + 1) of tests/data/held-out-emoji.png; 5 frames, seed 0. "before": the recipe of a blend
made before the change (guided inversion and decoding, the preset's steps: `guidance_ramp` false, decoder steps
as then); "after": as `unclip blend` runs now. Per setting: the end frames' feature distance (1 - cosine) to their
images, how often the image's concept stays in the classifier's top 5 there, and the share of consecutive frames
that move toward B (`evaluate.blend_progress` on the classifier's cosines).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=str(REPO / "weights" / "emoji"))
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--quality", default="fast")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from measure_strength import Yardstick, held_out

    from unclip_cli.engine import Engine
    from unclip_cli.evaluate import blend_progress
    from unclip_cli.requests import BLEND_DECODER_STEP_FACTOR, QUALITY, BlendRequest

    t0 = time.time()
    engine, judge = Engine.load(args.weights, device="cpu"), Yardstick()
    tiles, concepts = held_out(2 * args.pairs)
    feat_src, _ = judge(tiles)
    settings = {"before": {"guidance_ramp": False, "decoder_steps": QUALITY[args.quality].decoder * BLEND_DECODER_STEP_FACTOR},
                "after": {}}
    report = {"pairs": args.pairs, "quality": args.quality, "seed": 0}
    for name, kw in settings.items():
        reqs = [BlendRequest(image_a=tiles[2 * k], image_b=tiles[2 * k + 1], frames=5, seed=0, quality=args.quality, **kw)
                for k in range(args.pairs)]
        results = engine.run_many(reqs, batch_size=5)
        ends, kept, progress = [], [], []
        for k, res in enumerate(results):
            feat, top5 = judge(res.images)
            a, b = feat_src[2 * k], feat_src[2 * k + 1]
            ends += [1 - float(feat[0] @ a), 1 - float(feat[-1] @ b)]
            kept += [concepts[2 * k] in top5[0], concepts[2 * k + 1] in top5[-1]]
            progress.append(blend_progress(feat @ a, feat @ b))
        report[name] = {"end_feature_distance": round(float(np.mean(ends)), 4), "end_concept_kept_top5": f"{sum(kept)} of {len(kept)}",
                        "progress_toward_b": round(float(np.mean(progress)), 3), "decoder_steps": results[0].recipes[0]["steps"]["decoder"]}
        print(name, report[name], f"({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    report["command"] = "python scripts/measure_blend.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
