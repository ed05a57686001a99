"""Which prompts the model draws recognisably (issue 24, item 2: the README's examples): for each prompt, -n 4
at --quality default, seed 0 (--seed), and how many of the 4 images have the prompt's concept in the independent
classifier's top 5 (the concept whose English or Chinese name is the prompt, from concepts.json; or, for a prompt
written PROMPT=NAME|NAME, any of the concepts so named: what an everyday prompt means).

    python scripts/check_prompts.py "cat face" "red heart" 猫脸 ...
    python scripts/check_prompts.py "a dog=dog|dog face" "火箭=rocket" --out ~/unclip-runs/everyday.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompts", nargs="+")
    ap.add_argument("--quality", default="default")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0, help="the first image's seed (a README command's own --seed)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)

    from measure_strength import Yardstick

    from unclip_cli.domain import load_concepts
    from unclip_cli.engine import Engine
    from unclip_cli.requests import GenerateRequest

    weights = REPO / "weights" / "emoji"
    concepts = load_concepts(weights).entries
    engine, judge = Engine.load(weights, device="cpu"), Yardstick()
    out = {}
    for arg in args.prompts:
        p, _, meant = arg.partition("=")
        names = meant.split("|") if meant else [p]
        codes = [c["concept"] for c in concepts if c["en"] in names or c["zh"] in names]
        if meant and len(codes) < len(names):
            sys.exit(f"{arg}: not every name is a concept's English or Chinese name")
        images = engine.run(GenerateRequest(prompt=p, n=args.n, seed=args.seed, quality=args.quality)).images
        _, top5 = judge(images)
        hits = sum(any(c in t for c in codes) for t in top5) if codes else None
        out[p] = {"concepts": codes, "in_top5": hits, "of": args.n, "seed": args.seed, "quality": args.quality}
        print(p, out[p], file=sys.stderr, flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(out, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
