"""Measure when `unclip concepts QUERY` says that even the nearest concepts by meaning are far (issue 24), and write
the rates into WEIGHTS/concepts.json (`meaning.facts`).

    python scripts/calibrate_concepts_meaning.py --data ~/.cache/unclip/emoji-256 [--write]

A query that no name or keyword holds and that shares no word with any concept is answered with the concepts whose
names are nearest to it by the set's CLIP text embedding (`Engine.nearest_concepts`). Some always are nearest; the
command says they are far (`domain.far_in_meaning`) when the query has a word the set's CLIP never saw in training
(`Engine.unknown_words`, the prompt warning's test) or no letter at all. The script reports how often that fires on
the held-out prompts (captions of held-out images, English and Chinese), on the concept names themselves, on everyday
prompts and on nonsense queries (random letters, keyboard runs, digits and signs: seeded, so the same every run), and
the best CLIP cosine of each group, which was the first candidate and does not separate them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))


def nonsense(k: int = 400, seed: int = 0) -> list[str]:
    """Queries that mean nothing: random lower-case letter strings of one to three words, keyboard runs and digit strings."""
    rng = random.Random(seed)
    rows = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]
    out = []
    for i in range(k):
        kind = i % 4
        if kind < 2:
            out.append(" ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9)))
                                for _ in range(rng.randint(1, 3))))
        elif kind == 2:
            row = rng.choice(rows)
            start = rng.randrange(len(row) - 3)
            out.append(row[start:start + rng.randint(3, len(row) - start)] * rng.randint(1, 2))
        else:
            out.append("".join(rng.choice(string.digits + "#%&*+-=") for _ in range(rng.randint(3, 10))))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=str(REPO / "weights" / "emoji"))
    ap.add_argument("--data", default=os.path.expanduser("~/.cache/unclip/emoji-256"))
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from calibrate_concepts import EVERYDAY
    from unclip_cli.checkpoint import atomic_write
    from unclip_cli.domain import CONCEPTS_FILE, far_in_meaning
    from unclip_cli.engine import Engine

    torch.set_num_threads(1)
    engine = Engine.load(args.weights, device="cpu")
    held = [p["prompt"] for p in json.loads(Path(args.data, "eval_prompts.json").read_text(encoding="utf-8"))]
    junk = nonsense()

    names = [c["en"] for c in engine.concepts.entries] + [c["zh"] for c in engine.concepts.entries]
    groups = {"held_out": held, "concept_names": names, "everyday": EVERYDAY, "nonsense": junk}

    def measure(texts):
        far = [t for t in texts if far_in_meaning(t, engine.unknown_words(t))]
        row = {"prompts": len(texts), "far": len(far), "rate": round(len(far) / len(texts), 4)}
        if len(texts) <= 1000:  # the CLIP cosine, for the record (it does not separate them)
            row["best_cosine_median"] = round(float(np.median([engine.nearest_concepts(t, 1)[0][0] for t in texts])), 4)
        return row, far

    facts = {"rule": "far when the query has a word the set's CLIP never saw in training, or no letter at all"}
    for name, texts in groups.items():
        facts[name], far = measure(texts)
        if name in ("held_out", "everyday"):
            facts[name]["which"] = far
    facts["nonsense_not_far"] = [t for t in junk if not far_in_meaning(t, engine.unknown_words(t))][:20]
    facts["command"] = "python scripts/calibrate_concepts_meaning.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(json.dumps(facts, indent=1, ensure_ascii=False))
    if args.write:
        path = Path(args.weights) / CONCEPTS_FILE
        raw = json.loads(path.read_text(encoding="utf-8"))
        raw = {k: raw[k] for k in raw if k != "concepts"} | {"meaning": {"facts": facts}, "concepts": raw["concepts"]}
        text = json.dumps(raw, ensure_ascii=False, indent=0) + "\n"
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
