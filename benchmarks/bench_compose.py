"""Placement, measured: does `unclip compose` put object A in box A and B in box B more often than `generate`?

    python benchmarks/bench_compose.py --data ~/.cache/unclip/emoji-256 --pairs 50 --seeds 4

A GenEval-style set from held-out emoji concepts (never the sampling CLIP as judge): pairs of held-out concepts x
{left of, right of, above, below}, colour pairs (two concepts that differ by colour: hearts, circles, squares),
and counts ("two X"). The checker crops each requested box and asks the project's independent concept classifier
(weights/classifier) whether A beats B in box A and B beats A in box B (for counts: X among its top 5 in both
boxes). It is calibrated first on real held-out emoji pasted into the requested boxes (should pass) and into
swapped boxes (should fail; for counts, one box left empty). Then plain `generate` with the same sentence,
compose's `paste` and `fuse` methods, with seconds per image.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, add_run_options, append_results, apply_threads, load_note, machine_lines  # noqa: E402

RELATIONS = ("left of", "right of", "above", "below")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "brown", "black", "white")
COLOURED = ("heart", "circle", "square")


def checks(classifier, index, image, objects, count: bool):
    """Whether each object wins its box: pairwise (A over B in A's box, B over A in B's) or, for a count, the
    concept among the top 5 in every box."""
    from unclip_cli.evaluate import classify

    W, H = image.size
    crops = [image.crop((round(l * W), round(t * H), round(r * W), round(b * H))) for _, (l, t, r, b), _ in objects]
    logits = classify(classifier, crops)
    ids = [index[c] for _, _, c in objects]
    if count:
        return all(ids[0] in logits[k].topk(5).indices.tolist() for k in range(len(objects)))
    a, b = ids
    return bool(logits[0, a] > logits[0, b] and logits[1, b] > logits[1, a])


def paste(images, boxes, size=128):
    """Real emoji pasted into boxes on white (each shrunk to fit its box, keeping its aspect)."""
    from PIL import Image

    canvas = Image.new("RGB", (size, size), "white")
    for im, (l, t, r, b) in zip(images, boxes):
        w, h = round((r - l) * size), round((b - t) * size)
        side = min(w, h)
        canvas.paste(im.convert("RGB").resize((side, side), Image.Resampling.LANCZOS),
                     (round(l * size) + (w - side) // 2, round(t * size) + (h - side) // 2))
    return canvas


def prompt_set(data, index, pairs: int, seed: int = 0):
    """[(sentence, [(phrase, box, concept)], kind)] from held-out concepts with an English name the classifier knows."""
    from unclip_cli.layout import parse

    rng = random.Random(seed)
    names = {}
    for it in data.items:
        cap = data.concept_text["en"].get(it.concept) if isinstance(data.concept_text.get("en"), dict) else None
        cap = cap or (it.captions.get("en") or [None])[0]
        if cap and it.concept in index and len(cap) <= 24:
            names.setdefault(it.concept, cap.lower())
    concepts = sorted(names)
    out = []
    for _ in range(pairs):
        a, b = rng.sample(concepts, 2)
        for rel in RELATIONS:
            sentence = f"{names[a]} {rel} {names[b]}"
            objs = parse(sentence)
            out.append((sentence, [(objs[0][0], objs[0][1], a), (objs[1][0], objs[1][1], b)], "relation"))
    by_name = {v: k for k, v in names.items()}
    for shape in COLOURED:
        have = [c for c in COLOURS if f"{c} {shape}" in by_name]
        for x, y in zip(have, have[1:]):
            sentence = f"a {x} {shape} and a {y} {shape}"
            objs = parse(sentence)
            out.append((sentence, [(objs[0][0], objs[0][1], by_name[f"{x} {shape}"]), (objs[1][0], objs[1][1], by_name[f"{y} {shape}"])],
                        "colour"))
    for c in rng.sample(concepts, min(len(concepts), max(8, pairs // 4))):
        sentence = f"two {names[c]}s" if not names[c].endswith("s") else f"two {names[c]}"
        objs = parse(sentence)
        out.append((sentence, [(objs[0][0], objs[0][1], c), (objs[1][0], objs[1][1], c)], "count"))
    return out, {c: next(it.image for it in data.items if it.concept == c) for c in concepts}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the emoji corpus (its val-* shards are the held-out concepts)")
    ap.add_argument("--weights", default=str(REPO / "weights" / "emoji"))
    ap.add_argument("--pairs", type=int, default=50, help="concept pairs (x 4 relations), plus colour pairs and counts")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--quality", default="fast")
    ap.add_argument("--methods", nargs="+", default=["generate", "paste", "fuse"])
    ap.add_argument("--calibrate-only", action="store_true")
    ap.add_argument("--save", help="a folder for a contact sheet of the first prompts")
    add_run_options(ap)
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    start_load = os.getloadavg()
    from unclip_cli import checkpoint
    from unclip_cli.engine import Engine
    from unclip_cli.evaluate import load_eval_data
    from unclip_cli.requests import ComposeRequest, GenerateRequest

    classifier = checkpoint.load(REPO / "weights" / "classifier" / "emoji-concepts.safetensors", "classifier")
    index = {c: k for k, c in enumerate(classifier.extra["concepts"])}
    data = load_eval_data(Path(args.data).expanduser())
    prompts, real = prompt_set(data, index, args.pairs)
    kinds = sorted({k for _, _, k in prompts})
    body = machine_lines() + [f"- {len(prompts)} prompts ({', '.join(f'{sum(k == x for *_, k in prompts)} {x}' for x in kinds)}) from "
                              f"{len(real)} held-out concepts; the checker is weights/classifier (independent of the sampling CLIP)"]

    # -- calibration on real held-out emoji: pasted where asked (pass), swapped or one box empty (fail)
    cal = {"pasted": [], "swapped": []}
    for _, objs, kind in prompts:
        boxes = [box for _, box, _ in objs]
        images = [real[c] for _, _, c in objs]
        cal["pasted"].append(checks(classifier, index, paste(images, boxes), objs, kind == "count"))
        wrong = paste(images[:1], boxes[:1]) if kind == "count" else paste(images[::-1], boxes)
        cal["swapped"].append(checks(classifier, index, wrong, objs, kind == "count"))
    body += ["", "Checker calibration (real held-out emoji pasted into the boxes on white, 128 px):", "",
             "| prompts | pasted as asked: pass | swapped (counts: one box empty): pass |", "|---|---|---|"]
    for kind in kinds + ["all"]:
        sel = [i for i, (*_, k) in enumerate(prompts) if kind in ("all", k)]
        body.append(f"| {kind} ({len(sel)}) | {sum(cal['pasted'][i] for i in sel) / len(sel):.1%} | "
                    f"{sum(cal['swapped'][i] for i in sel) / len(sel):.1%} |")
    print("\n".join(body), flush=True)
    if not args.calibrate_only:
        engine = Engine.load(args.weights, device="cpu")
        rows, sheet = {}, []
        for method in args.methods:
            passed, seconds, n = [], 0.0, 0
            for p, (sentence, objs, kind) in enumerate(prompts):
                t = time.perf_counter()
                if method == "generate":
                    req = GenerateRequest(prompt=sentence, n=args.seeds, seed=1000 + p, quality=args.quality)
                else:
                    req = ComposeRequest(prompt=sentence, n=args.seeds, seed=1000 + p, quality=args.quality, method=method)
                images = engine.run(req).images
                seconds += time.perf_counter() - t
                n += len(images)
                passed += [(kind, checks(classifier, index, im, objs, kind == "count")) for im in images]
                if p < 6:
                    sheet.append(images[0])
            rows[method] = (passed, seconds / n)
            print(f"{method}: {sum(ok for _, ok in passed) / len(passed):.1%} in {seconds / n:.2f} s per image", file=sys.stderr, flush=True)
        body += ["", f"Placement by method ({args.seeds} seeds per prompt, quality {args.quality}; the same checker):", "",
                 "| method | " + " | ".join(kinds) + " | all | s per image |", "|---|" + "---|" * (len(kinds) + 2)]
        for method, (passed, sec) in rows.items():
            rates = [sum(ok for k, ok in passed if k == kind) / max(1, sum(k == kind for k, _ in passed)) for kind in kinds]
            body.append(f"| {method} | " + " | ".join(f"{r:.1%}" for r in rates) + f" | {sum(ok for _, ok in passed) / len(passed):.1%} | {sec:.2f} |")
        if args.save:
            from unclip_cli.imageio import grid

            Path(args.save).mkdir(parents=True, exist_ok=True)
            grid(sheet).save(Path(args.save) / "compose-bench.png")
    body.insert(2, load_note(start_load))
    print("\n".join(body[-(len(rows) + 4):]) if not args.calibrate_only else "")
    if not args.no_results:
        print(f"appended to {append_results('compose — placement by an independent checker', body)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
