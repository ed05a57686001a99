"""Does `nudge --to TARGET` reach its target, and at what --amount (issue 24, trial 4)? Measured with the independent
concept classifier (weights/classifier), not the sampling CLIP: for each source image and target text (both trained
concepts), at each amount, the rank (1 = its first choice, of 1,949) and probability the classifier gives the
target's concept and the source's.

    python scripts/measure_nudge.py --pairs 0,1,3,4,5 --amounts 0.4 --cache /tmp/src --out a0.4.json --sheet a0.4.png

(the model card's table: one amount a run, 0.2, 0.4, 0.5, 0.7 and 1, about 2 CPU-minutes each once --cache holds
the model's own sources).

Sources: real held-out emoji (the corpus' val shard; --data) and the model's own output for the source's name
(`generate NAME -n 4 --seed 0`, the first of the four whose concept the classifier puts in its top 5, so the source
is what it claims to be). Every nudge is one image (-n 1) at --amount A, seed 0, `--from-text` the source's name,
so each row is what `unclip nudge IMG --from-text SOURCE --to TARGET --amount A` gives.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (source name, held-out image key in the val shard, target name, far): a near target keeps the source's layout and
# changes one thing (species, colour); a far one changes the shape.
PAIRS = [
    ("cat face", "fluent-3d_1f431", "dog face", False),
    ("cat face", "fluent-3d_1f431", "tiger face", False),
    ("dog face", "fluent-flat_1f436", "cat face", False),
    ("purple heart", "twemoji_1f49c", "green heart", False),
    ("cat face", "fluent-3d_1f431", "red heart", True),
    ("pizza", "twemoji_1f355", "cat face", True),
]


def held_out_images(shard: Path, keys: set[str]):
    from PIL import Image

    with tarfile.open(shard) as tar:
        return {k: Image.open(io.BytesIO(tar.extractfile(f"{k}.png").read())).convert("RGB") for k in keys}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=str(REPO / "weights" / "emoji"))
    ap.add_argument("--data", default=str(Path("~/.cache/unclip/emoji-256/val-000000.tar").expanduser()),
                    help="the corpus' held-out shard")
    ap.add_argument("--amounts", default="0.2,0.4,0.5,0.7,1")
    ap.add_argument("--quality", default="default")
    ap.add_argument("--pairs", default=None, help="indices into PAIRS, e.g. 0,4 (default: all)")
    ap.add_argument("--kinds", default="real,own", help="which sources: real held-out emoji, the model's own output")
    ap.add_argument("--cache", default=None, help="keep the model's own source images here and reuse them (runs split by amount)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--sheet", default=None, help="a contact sheet: per row a source, then its nudges by amount")
    args = ap.parse_args(argv)

    import torch
    from PIL import Image

    from unclip_cli import checkpoint
    from unclip_cli.domain import load_concepts
    from unclip_cli.engine import Engine
    from unclip_cli.evaluate import classify
    from unclip_cli.requests import GenerateRequest, NudgeRequest

    t0 = time.time()
    pairs = [PAIRS[int(i)] for i in args.pairs.split(",")] if args.pairs else PAIRS
    kinds = args.kinds.split(",")
    amounts = [float(a) for a in args.amounts.split(",")]
    engine = Engine.load(args.weights, device="cpu")
    ck = checkpoint.load(REPO / "weights" / "classifier" / "emoji-concepts.safetensors", "classifier")
    index = {c: k for k, c in enumerate(ck.extra["concepts"])}
    code = {e["en"]: e["concept"] for e in load_concepts(Path(args.weights)).entries}

    def judge(images, names):
        """Per image: (rank, probability) of each name's concept under the classifier."""
        logits = classify(ck, images)
        p = logits.softmax(1)
        out = []
        for row, lp in zip(logits, p):
            out.append({n: (int((row > row[index[code[n]]]).sum()) + 1, round(float(lp[index[code[n]]]), 4)) for n in names})
        return out

    sources = {}
    if "real" in kinds:
        images = held_out_images(Path(args.data), {k for _, k, _, _ in pairs})
        for name, key, _, _ in pairs:
            sources[("real", name)] = images[key]
    if "own" in kinds:
        for name in dict.fromkeys(n for n, _, _, _ in pairs):
            kept = Path(args.cache) / f"own-{name}-{args.quality}.png" if args.cache else None
            if kept and kept.exists():
                sources[("own", name)] = Image.open(kept).convert("RGB")
                continue
            images = engine.run(GenerateRequest(prompt=name, n=4, seed=0, quality=args.quality)).images
            ranks = [j[name][0] for j in judge(images, [name])]
            pick = next((i for i, r in enumerate(ranks) if r <= 5), 0)
            sources[("own", name)] = images[pick]
            if kept:
                kept.parent.mkdir(parents=True, exist_ok=True)
                images[pick].save(kept)
            print(f"own {name!r}: source ranks {ranks}, took image {pick} of seed 0", file=sys.stderr, flush=True)
    jobs = [(kind, src, to) for src, _, to, _ in pairs for kind in kinds]
    far = {(src, to): f for src, _, to, f in pairs}
    rows = {f"{kind}: {src} -> {to}": {"kind": kind, "source": src, "target": to, "far": far[(src, to)],
                                       "before": judge([sources[(kind, src)]], [src, to])[0], "by_amount": {}}
            for kind, src, to in jobs}
    sheet = {key: [sources[(r["kind"], r["source"])]] for key, r in rows.items()}
    for a in amounts:
        reqs = [NudgeRequest(image=sources[(kind, src)], from_=src, to=to, amount=a, seed=0, quality=args.quality)
                for kind, src, to in jobs]
        outs = [r.images[0] for r in engine.run_many(reqs, batch_size=len(reqs))]
        for (kind, src, to), im in zip(jobs, outs):
            key = f"{kind}: {src} -> {to}"
            rows[key]["by_amount"][f"{a:g}"] = judge([im], [src, to])[0]
            sheet[key].append(im)
        print(f"amount {a:g} done ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    for key, r in rows.items():
        line = "  ".join(f"{a}: tgt {v[r['target']][0]} ({v[r['target']][1]:.2f}) src {v[r['source']][0]}" for a, v in r["by_amount"].items())
        b = r["before"]
        print(f"{key:40s} before: tgt {b[r['target']][0]} src {b[r['source']][0]} | {line}", file=sys.stderr)
    report = {"quality": args.quality, "amounts": amounts, "seed": 0, "rows": rows, "seconds": round(time.time() - t0, 1),
              "threads": torch.get_num_threads(),
              "command": "python scripts/measure_nudge.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    if args.sheet:
        side = 96
        canvas = Image.new("RGB", (side * (len(amounts) + 1), side * len(sheet)), "white")
        for r, ims in enumerate(sheet.values()):
            for c, im in enumerate(ims):
                canvas.paste(im.convert("RGB").resize((side, side), Image.Resampling.LANCZOS), (c * side, r * side))
        canvas.save(args.sheet)


if __name__ == "__main__":
    main()
