"""Placement, measured: does `unclip compose` put object A in box A and B in box B more often than `generate`?

    python benchmarks/bench_compose.py --data ~/.cache/unclip/emoji-256 --pairs 50 --seeds 4   # rerun to resume

A GenEval-style set from held-out emoji concepts (never the sampling CLIP as judge): pairs of held-out concepts x
{left of, right of, above, below}, colour pairs (two concepts that differ by colour: hearts, circles, squares),
and counts ("two X"). The checker crops each requested box and asks the project's independent concept classifier
(weights/classifier) whether A beats B in box A and B beats A in box B (for counts: X among its top 5 in both
boxes); the strict checker also asks for a mostly empty line between the boxes, so that one shape whose halves
carry the two objects' colours (what fuse often draws) fails. Both are calibrated first on real held-out emoji
pasted into the requested boxes (should pass), into swapped boxes (should fail; for counts, one box left empty)
and merged into one shape across both boxes (should fail). Then plain `generate` with the same sentence,
compose's `paste` and `fuse` methods, with seconds per image. Each finished image is stored under --out as it
comes, so a stopped run resumes where it was and every stored image is scored again by the current checkers.
"""

from __future__ import annotations

import argparse
import json
import math
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
METHODS = ("generate", "paste", "fuse")
# The strict checker's gap: a line between two boxes, within GAP_BAND of the canvas of their boundary, at most
# GAP_FILL covered by pixels further than GAP_COLOUR (of 255, any channel) from the background
GAP_BAND, GAP_FILL, GAP_COLOUR = 0.08, 0.1, 48


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


def strict_checks(classifier, index, image, objects, count: bool, lenient: bool | None = None):
    """The lenient check and the two boxes apart: one shape across both boxes (fuse's usual failure, its halves
    carrying the two objects' colours) fails. (Each box's concept in its crop's top 5 as well was measured and
    dropped: real pasted emoji passed only 63% of the time.)"""
    if lenient is None:
        lenient = checks(classifier, index, image, objects, count)
    return bool(lenient) and separated(image, [box for _, box, _ in objects])


def separated(image, boxes) -> bool:
    """Whether a mostly empty line runs between two boxes: within GAP_BAND of the boundary between them, a column
    (boxes side by side) or row (one above the other), over the extent the boxes share, at most GAP_FILL covered.
    The background is the median colour of the image's outer ring: the set's white is often tinted."""
    import numpy as np

    a = np.asarray(image.convert("RGB"), dtype=np.int16)
    H, W = a.shape[:2]
    ring = np.concatenate([a[:2].reshape(-1, 3), a[-2:].reshape(-1, 3), a[:, :2].reshape(-1, 3), a[:, -2:].reshape(-1, 3)])
    filled = np.abs(a - np.median(ring, 0)).max(-1) > GAP_COLOUR  # (H, W)
    (l0, t0, r0, b0), (l1, t1, r1, b1) = boxes[:2]
    if min(r0, r1) <= max(l0, l1) + 1e-6:  # side by side: columns between them, over the rows both span
        mid, lo, hi, size = (min(r0, r1) + max(l0, l1)) / 2, max(t0, t1), min(b0, b1), W
    elif min(b0, b1) <= max(t0, t1) + 1e-6:  # one above the other: rows, over the columns both span
        filled, mid, lo, hi, size = filled.T, (min(b0, b1) + max(t0, t1)) / 2, max(l0, l1), min(r0, r1), H
    else:
        return False  # overlapping boxes have no gap
    lines = filled[round(lo * filled.shape[0]) : round(hi * filled.shape[0]),
                   max(0, round((mid - GAP_BAND) * size)) : round((mid + GAP_BAND) * size) + 1]
    return bool(lines.size) and float(lines.mean(0).min()) <= GAP_FILL


def merged(images, boxes, size=128):
    """One shape across both boxes, its half on the first box's side from the first image and the rest from the
    second (what fuse often draws): a square as tall as the boxes, centred on their boundary, on white."""
    from PIL import Image

    (l0, t0, r0, b0), (l1, t1, r1, b1) = boxes[:2]
    across = min(r0, r1) <= max(l0, l1) + 1e-6
    side = round((min(b0, b1) - max(t0, t1) if across else min(r0, r1) - max(l0, l1)) * size)
    mid = round((min(r0, r1) + max(l0, l1)) / 2 * size) if across else round((min(b0, b1) + max(t0, t1)) / 2 * size)
    centre = round((max(t0, t1) + min(b0, b1)) / 2 * size) if across else round((max(l0, l1) + min(r0, r1)) / 2 * size)
    first_before = (l0 < l1) if across else (t0 < t1)
    a, b = (im.convert("RGB").resize((side, side), Image.Resampling.LANCZOS) for im in images[:2])
    if not first_before:
        a, b = b, a
    half = side // 2
    shape = Image.new("RGB", (side, side))
    cut = (half, 0, side, side) if across else (0, half, side, side)
    shape.paste(a, (0, 0))
    shape.paste(b.crop(cut), cut[:2])
    canvas = Image.new("RGB", (size, size), "white")
    canvas.paste(shape, (mid - half, centre - half) if across else (centre - half, mid - half))
    return canvas


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


def load_done(out: Path) -> dict:
    """The finished items of a run folder: {(prompt index, method, seed): record} for each valid line of
    results.jsonl whose image is there. The file is ours but read as untrusted: a line cut by a kill, or of the
    wrong shape, is skipped (that item runs again)."""
    done, log = {}, out / "results.jsonl"
    if not log.exists():
        return done
    for line in log.read_text().splitlines():
        try:
            r = json.loads(line)
            key = (int(r["p"]), str(r["method"]), int(r["seed"]))
            seconds = float(r["seconds"])
        except (ValueError, KeyError, TypeError):
            continue
        if key[1] in METHODS and math.isfinite(seconds) and (out / item_file(*key)).is_file():
            done[key] = {"seconds": seconds, "load": r.get("load") if isinstance(r.get("load"), (int, float)) else None}
    return done


def item_file(p: int, method: str, seed: int) -> str:
    return f"{method}/{p:03d}-{seed}.png"


def store(out: Path, p: int, method: str, seed: int, image, seconds: float) -> None:
    """One finished item: its PNG (written whole, then renamed), then its line in results.jsonl."""
    path = out / item_file(p, method, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps({"p": p, "method": method, "seed": seed, "seconds": round(seconds, 3), "load": round(os.getloadavg()[0], 2)}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def check_manifest(out: Path, manifest: dict) -> None:
    """A run folder belongs to one prompt set and quality: resuming with other settings would mix two runs."""
    path = out / "manifest.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        if old != manifest:
            raise SystemExit(f"Error: {out} holds a run with other settings (prompts, seeds, quality or weights); "
                             "use another --out, or the same settings to resume")
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(manifest, indent=1))


def calibration(classifier, index, prompts, real) -> list[str]:
    """Both checkers on real held-out emoji: pasted where asked (should pass), swapped or, for counts, one box
    empty (should fail), and merged: one shape across both boxes whose half on A's side is A's and on B's side
    B's (what fuse draws; should fail)."""
    cal = {(c, k): [] for c in ("lenient", "strict") for k in ("pasted", "swapped", "merged")}
    for _, objs, kind in prompts:
        boxes = [box for _, box, _ in objs]
        images = [real[c] for _, _, c in objs]
        cases = {"pasted": paste(images, boxes),
                 "swapped": paste(images[:1], boxes[:1]) if kind == "count" else paste(images[::-1], boxes),
                 "merged": merged(images, boxes)}
        for case, image in cases.items():
            ok = checks(classifier, index, image, objs, kind == "count")
            cal[("lenient", case)].append(ok)
            cal[("strict", case)].append(strict_checks(classifier, index, image, objs, kind == "count", lenient=ok))
    kinds = sorted({k for _, _, k in prompts})
    lines = ["", "Checker calibration (real held-out emoji on white, 128 px; pass rates):", "",
             "| prompts | lenient: pasted | swapped | merged | strict: pasted | swapped | merged |", "|---|---|---|---|---|---|---|"]
    for kind in kinds + ["all"]:
        sel = [i for i, (*_, k) in enumerate(prompts) if kind in ("all", k)]
        lines.append(f"| {kind} ({len(sel)}) | " + " | ".join(f"{sum(cal[(c, x)][i] for i in sel) / len(sel):.1%}"
                                                             for c in ("lenient", "strict") for x in ("pasted", "swapped", "merged")) + " |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the emoji corpus (its val-* shards are the held-out concepts)")
    ap.add_argument("--weights", default=str(REPO / "weights" / "emoji"))
    ap.add_argument("--pairs", type=int, default=50, help="concept pairs (x 4 relations), plus colour pairs and counts")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--quality", default="fast")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--out", default="~/unclip-runs/compose-full",
                    help="the run folder: each finished (prompt, seed, method) image and its line in results.jsonl; a rerun "
                         "with the same settings skips what is there and scores everything from the stored images")
    ap.add_argument("--calibrate-only", action="store_true")
    ap.add_argument("--score-only", action="store_true", help="score what --out holds; generate nothing, skip the calibration")
    ap.add_argument("--save", help="a folder for a contact sheet of the first prompts")
    add_run_options(ap)
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    start_load = os.getloadavg()
    from unclip_cli import checkpoint
    from unclip_cli.evaluate import load_eval_data

    classifier = checkpoint.load(REPO / "weights" / "classifier" / "emoji-concepts.safetensors", "classifier")
    index = {c: k for k, c in enumerate(classifier.extra["concepts"])}
    data = load_eval_data(Path(args.data).expanduser())
    prompts, real = prompt_set(data, index, args.pairs)
    kinds = sorted({k for _, _, k in prompts})
    body = machine_lines() + [f"- {len(prompts)} prompts ({', '.join(f'{sum(k == x for *_, k in prompts)} {x}' for x in kinds)}) from "
                              f"{len(real)} held-out concepts; the checker is weights/classifier (independent of the sampling CLIP)",
                              "- Checkers: **lenient**, A beats B in box A and B beats A in box B (counts: X in the top 5 of both "
                              "boxes); **strict**, that and, between the boxes, a line at most "
                              f"{GAP_FILL:.0%} covered by anything other than the background (one shape across both boxes fails)"]
    if args.score_only:  # the calibration is the same on every run (`--calibrate-only` prints it alone)
        body.append("- Checker calibration: not rerun here (`--calibrate-only`)")
    else:
        body += calibration(classifier, index, prompts, real)
    print("\n".join(body), flush=True)
    rows = {}
    if not args.calibrate_only:
        out = Path(args.out).expanduser()
        weights = Path(args.weights)
        check_manifest(out, {"prompts": [s for s, _, _ in prompts], "seeds": args.seeds, "quality": args.quality,
                             "weights": {f.name: f.stat().st_size for f in sorted(weights.glob("*.safetensors"))}})
        done = load_done(out)
        # Prompts in a fixed shuffled order, every method and seed of one prompt before the next: a run stopped
        # early has all methods on the same prompts, of every kind.
        order = list(range(len(prompts)))
        random.Random(1).shuffle(order)
        todo = [(p, m) for p in order for m in args.methods if any((p, m, 1000 + p + i) not in done for i in range(args.seeds))]
        print(f"{out}: {len(done)} items done, {len(todo)} (prompt, method) left", file=sys.stderr, flush=True)
        if todo and not args.score_only:
            from unclip_cli.engine import Engine
            from unclip_cli.requests import ComposeRequest, GenerateRequest

            engine = Engine.load(args.weights, device="cpu")
            for p, method in todo:
                sentence = prompts[p][0]
                missing = [1000 + p + i for i in range(args.seeds) if (p, method, 1000 + p + i) not in done]
                for run in consecutive(missing):  # -n images come from consecutive seeds, each as if drawn alone
                    t = time.perf_counter()
                    if method == "generate":
                        req = GenerateRequest(prompt=sentence, n=len(run), seed=run[0], quality=args.quality)
                    else:
                        req = ComposeRequest(prompt=sentence, n=len(run), seed=run[0], quality=args.quality, method=method)
                    images = engine.run(req).images
                    seconds = (time.perf_counter() - t) / len(images)
                    for seed, image in zip(run, images):
                        store(out, p, method, seed, image, seconds)
                        done[(p, method, seed)] = {"seconds": seconds, "load": os.getloadavg()[0]}
        rows, complete = score(classifier, index, prompts, out, done, args.methods, args.seeds)
        status = (f"all {len(prompts)} prompts" if len(complete) == len(prompts)
                  else f"**partial: {len(complete)} of {len(prompts)} prompts** have every method and seed; the rates are over those")
        loads = [r["load"] for r in done.values() if r.get("load") is not None]
        body += ["", f"Placement by method ({args.seeds} seeds per prompt, quality {args.quality}; {status}; run folder "
                     f"{out}, load average while generating {min(loads, default=0):.1f} to {max(loads, default=0):.1f}):", "",
                 "| method | checker | " + " | ".join(kinds) + " | all | s per image |", "|---|---|" + "---|" * (len(kinds) + 2)]
        for method, (passed, sec) in rows.items():
            for c in ("lenient", "strict"):
                rates = [f"{sum(ok[c] for k, ok in passed if k == kind) / n:.1%}" if (n := sum(k == kind for k, _ in passed)) else "-"
                         for kind in kinds]
                body.append(f"| {method} | {c} | " + " | ".join(rates) + f" | {sum(ok[c] for _, ok in passed) / max(1, len(passed)):.1%} | {sec:.2f} |")
        if args.save and complete:
            from PIL import Image

            from unclip_cli.imageio import grid

            Path(args.save).mkdir(parents=True, exist_ok=True)
            grid([Image.open(out / item_file(p, m, 1000 + p)) for m in args.methods for p in complete[:6]]).save(Path(args.save) / "compose-bench.png")
        if len(complete) < len(prompts):
            body.append(f"- To finish: rerun the same command; it skips the {len(done)} stored items.")
    body.insert(2, load_note(start_load))
    print("\n".join(body[-(2 * len(rows) + 4):]) if rows else "")
    if not args.no_results:
        partial = any(line.startswith("- To finish") for line in body)
        title = "compose — placement by an independent checker" + (" (PARTIAL RUN)" if partial else "")
        print(f"appended to {append_results(title, body)}", file=sys.stderr)
    return 0


def consecutive(seeds: list[int]) -> list[list[int]]:
    runs = []
    for s in seeds:
        if runs and runs[-1][-1] == s - 1:
            runs[-1].append(s)
        else:
            runs.append([s])
    return runs


def score(classifier, index, prompts, out: Path, done: dict, methods, seeds: int):
    """Both checkers on every stored image of the prompts that have every method and seed:
    ({method: ([(kind, {"lenient": bool, "strict": bool})], seconds per image)}, those prompts' indices)."""
    from PIL import Image

    complete = [p for p in range(len(prompts)) if all((p, m, 1000 + p + i) in done for m in methods for i in range(seeds))]
    rows = {}
    for m in methods:
        passed, seconds = [], []
        for p in complete:
            _, objs, kind = prompts[p]
            for i in range(seeds):
                with Image.open(out / item_file(p, m, 1000 + p + i)) as f:
                    image = f.convert("RGB")
                ok = checks(classifier, index, image, objs, kind == "count")
                passed.append((kind, {"lenient": ok, "strict": strict_checks(classifier, index, image, objs, kind == "count", lenient=ok)}))
                seconds.append(done[(p, m, 1000 + p + i)]["seconds"])
        rows[m] = (passed, sum(seconds) / max(1, len(seconds)))
    return rows, complete


if __name__ == "__main__":
    raise SystemExit(main())
