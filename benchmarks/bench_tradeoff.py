"""Quality against seconds: sampling settings of `unclip generate -n 4`, each measured for speed and for
what the user gets, on the first held-out prompts of the corpus.

For each setting (prior, decoder and upsampler steps, decoder candidates, guidance):

- seconds: the in-process time of `generate -n 4` (one batch of 4, as the command makes it), the mean
  over all prompts, plus the start-up of a whole process (imports, model load, writing PNGs), measured
  once in this run as `unclip generate -n 4 --quality default` whole minus the same in-process;
- the independent yardstick: top-1 / top-5 of the concept classifier trained apart from the model
  (weights/classifier), on one image per prompt, with the same seeds for every setting;
- sharpness: power in the 4-8 and 2-4 px detail bands as a share of the real held-out images'
  (evaluate.band_power), at the real images' size.

The set's own CLIP is not used to score: it picks among decoder candidates, so it would flatter them.

    python benchmarks/bench_tradeoff.py --data ~/.cache/unclip/emoji-256 --prompts 120
    python benchmarks/bench_tradeoff.py --settings 16,20,4,3,3 8,10,3,1,3 --prompts 8 --no-results
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import numpy as np

import common

# (prior, decoder, upsampler) steps, decoder candidates, guidance: the presets first, then single changes.
SETTINGS = [
    (8, 10, 3, 1, 3.0),   # fast
    (16, 20, 4, 3, 3.0),  # default
    (32, 50, 8, 4, 3.0),  # best
    (8, 10, 3, 2, 3.0),
    (16, 20, 4, 1, 3.0),
    (16, 10, 4, 3, 3.0),
    (16, 20, 2, 3, 3.0),
    (16, 20, 8, 3, 3.0),
    (16, 20, 4, 3, 2.0),
    (16, 20, 4, 3, 4.0),
]
PRESETS = {(8, 10, 3, 1, 3.0): "fast", (16, 20, 4, 3, 3.0): "default", (32, 50, 8, 4, 3.0): "best"}
N = 4  # images per command, one batch


def parse_setting(text: str) -> tuple:
    parts = text.split(",")
    if len(parts) != 5:
        raise argparse.ArgumentTypeError("a setting is PRIOR,DECODER,UPSAMPLER,CANDIDATES,GUIDANCE")
    return (*map(int, parts[:4]), float(parts[4]))


def run_setting(engine, prompts, setting, seed: int):
    """Images (one per prompt, prompt i with seed `seed + i`, in batches of 4 prompts) and the mean seconds of a
    batch of 4."""
    from unclip_cli.requests import GenerateRequest

    p, d, u, k, g = setting
    images, seconds = [], []
    for s in range(0, len(prompts), N):
        chunk = prompts[s : s + N]
        reqs = [GenerateRequest(prompt=q["prompt"], seed=seed + s + j, prior_steps=p, decoder_steps=d, upsampler_steps=u,
                                decoder_candidates=k, guidance=g) for j, q in enumerate(chunk)]
        t = time.perf_counter()
        results = engine.run_many(reqs, batch_size=N)
        seconds.append((time.perf_counter() - t) * N / len(chunk))
        images += [r.images[0] for r in results]
    return images, statistics.mean(seconds)


def startup_seconds(weights: Path, engine, prompt: str) -> float:
    """Whole `unclip generate -n 4 --quality default` minus the same in-process: imports, loading, PNGs."""
    from bench_generate import time_process
    from unclip_cli.requests import GenerateRequest

    whole, _ = time_process(weights, "default", N, prompt, repeats=2)
    inside = []
    for _ in range(2):
        t = time.perf_counter()
        engine.run(GenerateRequest(prompt=prompt, n=N, seed=0, quality="default"))
        inside.append(time.perf_counter() - t)
    return min(whole) - min(inside)


def main(argv=None) -> None:
    from unclip_cli import checkpoint
    from unclip_cli import evaluate as ev
    from unclip_cli.engine import Engine

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="weights/emoji")
    ap.add_argument("--random", help=argparse.SUPPRESS)
    ap.add_argument("--data", default=str(Path("~/.cache/unclip/emoji-256").expanduser()), help="corpus with val-* shards")
    ap.add_argument("--classifier", type=Path, default=Path("weights/classifier/emoji-concepts.safetensors"))
    ap.add_argument("--prompts", type=int, default=120, help="the first N held-out prompts (as `unclip eval` orders them)")
    ap.add_argument("--settings", type=parse_setting, nargs="+", default=SETTINGS, metavar="P,D,U,K,G")
    ap.add_argument("--seed", type=int, default=0)
    args, load_start, weights, notes = common.start(ap, argv)
    data = ev.load_eval_data(args.data)
    prompts = data.prompts[: args.prompts]
    classifier = checkpoint.load(args.classifier, "classifier")
    index = {c: k for k, c in enumerate(classifier.extra["concepts"])}
    labels = [index.get(p["concept"], -1) for p in prompts]
    size = ev.reference_size(data.items)
    real = ev.band_power([it.image for it in data.items], size)
    real_hits = ev.concept_hits(ev.classify(classifier, [it.image for it in data.items]), [index.get(it.concept, -1) for it in data.items])
    key_row = {it.key: r for r, it in enumerate(data.items)}
    rows_real = [key_row[p["key"]] for p in prompts if p.get("key") in key_row]

    engine = Engine.load(weights, device="cpu")
    startup = startup_seconds(weights, engine, prompts[0]["prompt"])
    print(f"start-up of a whole process: {startup:.2f} s", flush=True)
    rows = []
    for setting in args.settings:
        images, seconds = run_setting(engine, prompts, setting, args.seed)
        hits = ev.concept_hits(ev.classify(classifier, images), labels)
        share = ev.band_power(images, size) / real
        top1, top5 = hits["top1"].mean(), hits["top5"].mean()
        se5 = math.sqrt(top5 * (1 - top5) / len(images))
        p, d, u, k, g = setting
        name = PRESETS.get(setting, "")
        rows.append(f"| {name} | {p} / {d} / {u} | {k} | {g:g} | {seconds:.2f} s | {startup + seconds:.1f} s | {top1:.3f} | "
                    f"{top5:.3f} ± {se5:.3f} | {share[1]:.2f} / {share[2]:.2f} |")
        print(rows[-1], flush=True)
    body = [
        *common.machine_lines(),
        common.load_note(load_start),
        f"- Model set: `{weights}` ({engine.image_size} px); data: `{args.data}`, the first {len(prompts)} held-out prompts "
        f"({sum(p['lang'] == 'en' for p in prompts)} English, {sum(p['lang'] == 'zh' for p in prompts)} Chinese), one image each, seeds {args.seed}+.",
        f"- Classifier: `{args.classifier}`; on the real held-out images of the same prompts it scores top-1 "
        f"{np.mean(real_hits['top1'][rows_real]):.3f}, top-5 {np.mean(real_hits['top5'][rows_real]):.3f}.",
        f"- Sharpness: detail-band power as a share of the {len(data.items)} real held-out images' at {size} px (1 = as real; "
        "above 1 = grain or ringing).",
        f"- \"whole -n 4\": the in-process time plus a process's start-up ({startup:.2f} s, measured in this run).",
        *[f"- {n}" for n in notes],
        "",
        "| preset | steps prior / decoder / upsampler | candidates | guidance | -n 4 in-process | whole -n 4 | classifier top-1 | top-5 (± s.e.) | sharpness 4-8 / 2-4 px |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
    ]
    if args.no_results:
        print("\n".join(body))
    else:
        print(common.append_results("tradeoff — quality against seconds, generate -n 4", body))


if __name__ == "__main__":
    main()
