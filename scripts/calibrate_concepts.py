"""Calibrate the nearest-concept note (issue 24, item 2) and write it into WEIGHTS/concepts.json.

    python scripts/calibrate_concepts.py --data ~/.cache/unclip/emoji-256 [--write]

For each prompt, the cosine of its CLIP text embedding (the set's CLIP) to the nearest concept name
(`Engine.nearest_concepts`). The threshold is the 2nd percentile over the held-out prompts (the eval
prompts of the corpus: captions of held-out images, English and Chinese), so about 2% of them get the note;
the script reports how many everyday prompts (below; written for this purpose, never used to choose) get it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EVERYDAY = [
    "a dog", "a red car", "pizza", "a rocket", "two cats", "猫", "火箭", "a smiling cat", "a red hat", "a starry sky", "a tiger",
    "a photo of a dog on a beach", "a house by a lake", "a cup of coffee", "a man riding a bicycle", "sunset over the mountains",
    "an astronaut riding a horse", "a bowl of fruit", "a castle on a hill", "a robot", "a city at night", "a birthday party",
    "a cat sleeping on a sofa", "a vintage car", "a portrait of a woman", "a forest in autumn", "a dragon", "a teddy bear",
    "a sailing boat", "a snowman", "a bunch of flowers", "an old bridge over a river", "a bird on a branch", "a slice of cake",
    "a rainy street", "a cute puppy", "a lighthouse", "a plate of sushi", "a family picnic", "a skyscraper",
    "一只狗", "一辆红色的汽车", "夜晚的城市", "山上的日落", "一杯咖啡", "一只可爱的小猫", "海边的房子", "一束花",
]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=str(REPO / "weights" / "emoji"))
    ap.add_argument("--data", default=os.path.expanduser("~/.cache/unclip/emoji-256"))
    ap.add_argument("--percentile", type=float, default=2.0)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)

    from unclip_cli.checkpoint import atomic_write
    from unclip_cli.domain import CONCEPTS_FILE
    from unclip_cli.engine import Engine

    engine = Engine.load(args.weights, device="cpu")
    held = [p["prompt"] for p in json.loads(Path(args.data, "eval_prompts.json").read_text(encoding="utf-8"))]
    near = {p: engine.nearest_concepts(p, 3) for p in held + EVERYDAY}
    cos_held = np.array([near[p][0][0] for p in held])
    cos_every = np.array([near[p][0][0] for p in EVERYDAY])
    threshold = round(float(np.percentile(cos_held, args.percentile)), 4)
    facts = {
        "rule": "note when the prompt's CLIP text embedding has a cosine below the threshold to every concept name (en or zh)",
        "threshold": threshold, "percentile_of_held_out": args.percentile, "held_out_prompts": len(held),
        "held_out_noted": int((cos_held < threshold).sum()), "held_out_rate": round(float((cos_held < threshold).mean()), 4),
        "everyday_prompts": len(EVERYDAY), "everyday_noted": int((cos_every < threshold).sum()),
        "everyday_rate": round(float((cos_every < threshold).mean()), 4),
        "everyday_nearest": {p: [round(near[p][0][0], 3), near[p][0][1]["en"]] for p in EVERYDAY},
        "command": "python scripts/calibrate_concepts.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(json.dumps(facts, indent=2, ensure_ascii=False))
    if args.write:
        path = Path(args.weights) / CONCEPTS_FILE
        raw = json.loads(path.read_text(encoding="utf-8"))
        raw = {k: raw[k] for k in raw if k != "concepts"} | {"note": {"cosine_min": threshold, "facts": facts}, "concepts": raw["concepts"]}
        text = json.dumps(raw, ensure_ascii=False, indent=0) + "\n"
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
