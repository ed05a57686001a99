"""Training throughput per stage: images/s of the real training loop and its achieved FLOP/s as a
fraction of this machine's fp32 matmul peak (measured in the same run).

Each stage (clip, then prior, decoder and upsampler against that CLIP) runs `unclip_cli.train.loop.train`
for --warmup + --steps optimiser steps in a fresh run folder, logging every step; the median step time
after the warm-up gives images/s. The FLOPs of one step (forward and backward; the optimiser's
elementwise work is not counted) are counted with FlopCounterMode on the stage's task object
(`unclip_cli.train.stages.TASKS`) on a batch of the same size. For the decoder and upsampler it also times the
data path alone: the stage's loss with its network replaced by a stub, at --data-batch (a GPU's batch), which
is the host work a GPU step waits for. Appends a section to benchmarks/RESULTS.md.

    python benchmarks/bench_train.py                              # architecture of weights/emoji, else the emoji preset
    python benchmarks/bench_train.py --preset tiny --steps 3      # quick check of the script
    python benchmarks/bench_train.py --stages decoder --batch-size 64
    python benchmarks/bench_train.py --preset emoji256 --data ~/.cache/unclip/emoji-256 --stages decoder upsampler --data-on-device
"""

from __future__ import annotations

import argparse
import os
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import common

STAGES = ("clip", "prior", "decoder", "upsampler")


def preset_from_weights(weights: Path, train_from: str = "emoji") -> dict:
    """A preset with the architecture of a model set's checkpoints and the training hyperparameters of
    the `train_from` preset, so the benchmark trains exactly the shipped networks."""
    from unclip_cli import checkpoint
    from unclip_cli.modelset import upsampler_files
    from unclip_cli.presets import load_preset

    def cfg(kind, path):
        ck = checkpoint.load(path, kind)
        return ck

    base = load_preset(train_from)
    clip = cfg("clip", weights / "clip.safetensors")
    preset = {"name": f"from-{weights.name}", "clip": dataclasses.asdict(clip.config), "train": base["train"]}
    for kind in ("prior", "decoder"):
        ck = cfg(kind, weights / f"{kind}.safetensors")
        preset[kind] = {"model": dataclasses.asdict(ck.config), "diffusion": dataclasses.asdict(ck.diffusion)}
    ups = upsampler_files(weights)
    if len(ups) != 1:
        raise SystemExit(f"{weights} has {len(ups)} upsamplers; the trainer trains one")
    ck = cfg("upsampler", ups[0])
    preset["upsampler"] = {"scale": ck.extra["scale"], "model": dataclasses.asdict(ck.config), "diffusion": dataclasses.asdict(ck.diffusion)}
    return preset


def synthetic_corpus(root: Path, n: int = 512, size: int = 128) -> Path:
    """Coloured shapes with English and Chinese captions in train shards: only for when no corpus exists."""
    import io

    from PIL import Image, ImageDraw

    from unclip_cli.data.shards import ShardWriter

    rng = np.random.default_rng(0)
    shapes = ["circle", "square"]
    with ShardWriter(root, "train", per_shard=256) as w:
        for i in range(n):
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            shape = shapes[i % 2]
            img = Image.new("RGB", (size, size), "white")
            box = tuple(int(v) for v in sorted(rng.integers(4, size - 4, 2))) * 2
            (ImageDraw.Draw(img).ellipse if shape == "circle" else ImageDraw.Draw(img).rectangle)(box, fill=colour)
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            caps = {"en": [f"a {shape} of colour {colour}"], "zh": [f"颜色 {colour} 的{'圆' if shape == 'circle' else '方块'}"]}
            w.write(f"s{i:05d}", buf.getvalue(), "png", text=caps["en"][0], meta={"captions": caps, "concept": f"c{i}", "split": "train"})
    return root


def step_flops(stage: str, preset: str, data, run: Path, batch: int) -> tuple[int, int]:
    """FLOPs of one training step's forward and backward, on the stage's task with a batch of `batch`,
    and the number of trained parameters."""
    from unclip_cli.presets import load_preset
    from unclip_cli.train.stages import TASKS

    task = TASKS[stage](load_preset(preset), data, run, torch.device("cpu"))
    task.net = task.model
    task.model.train()
    idx = np.arange(min(batch, task.n))
    gen = torch.Generator().manual_seed(0)
    with common.flop_counter() as counter:
        task.loss(idx, gen).backward()
    return counter.get_total_flops(), sum(p.numel() for p in task.model.parameters() if p.requires_grad)


def data_path_seconds(stage: str, preset: str, data, run: Path, batch: int, on_device: bool, repeats: int) -> float | None:
    """Median seconds of one batch of the stage's data path: its loss with the network replaced by a stub that
    predicts zeros, so what is timed is the gathering, the random draws and the noising."""
    from unclip_cli.presets import load_preset
    from unclip_cli.train.stages import TASKS

    task = TASKS[stage](load_preset(preset), data, run, torch.device("cpu"))
    if on_device:
        if not getattr(task, "device_data", False):
            return None
        task.hold_data_on_device()
    task.net = lambda x, t, **kw: torch.zeros_like(x)
    times = []
    for r in range(repeats + 1):  # the first batch warms the page cache
        idx = np.random.default_rng(r).choice(task.n, size=batch, replace=batch > task.n)
        start = time.perf_counter()
        task.loss(idx, torch.Generator().manual_seed(r))
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", help="train the architecture of this model set (default: weights/emoji, unless --preset is given)")
    ap.add_argument("--preset", help="train this preset's architecture; with --weights, its training hyperparameters (default: emoji)")
    ap.add_argument("--data", default="~/.cache/unclip/emoji", help="corpus folder (default: ~/.cache/unclip/emoji)")
    ap.add_argument("--shards", type=int, default=2, help="train shards of --data to use (the image cache is built per run)")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--steps", type=int, default=5, help="timed optimiser steps per stage")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--batch-size", type=int, help="per-stage batch size (default: the preset's)")
    ap.add_argument("--data-on-device", action="store_true", help="decoder, upsampler: data as tensors on the device (here the CPU)")
    ap.add_argument("--data-batch", type=int, default=512, help="batch of the data-path timing (default: 512, v0.3's GPU batch)")
    common.add_run_options(ap)
    args = ap.parse_args(argv)
    load_start = os.getloadavg()
    common.apply_threads(args.threads)

    from unclip_cli.data.shards import expand_shards
    from unclip_cli.presets import load_preset
    from unclip_cli.train.loop import TrainOptions, train

    tmp = Path(tempfile.mkdtemp(prefix="unclip-bench-train-"))
    notes = []
    weights = Path(args.weights) if args.weights else Path("weights/emoji") if args.preset is None else None
    args.preset = args.preset or "emoji"
    if weights is not None and weights.is_dir() and any(weights.glob("*.safetensors")):
        preset_path = tmp / "preset.json"
        preset_path.write_text(json.dumps(preset_from_weights(weights, args.preset)))
        preset, arch = str(preset_path), f"the networks of `{weights}` (training hyperparameters of the `{args.preset}` preset)"
        label = weights.name
    else:
        preset, arch, label = args.preset, f"the `{args.preset}` preset", f"{args.preset} preset"
        if args.weights:
            notes.append(f"{weights} has no model set: timing the `{args.preset}` preset's architecture")
    data_dir = Path(args.data).expanduser()
    train_shards = [p for p in expand_shards(data_dir)] if data_dir.exists() else []
    train_shards = [p for p in train_shards if not p.name.startswith("val-")][: args.shards]
    if not train_shards:
        notes.append(f"**no corpus at {data_dir}: training on 512 synthetic shapes instead (throughput depends on the "
                     f"architecture and batch size, not on the pictures)**")
        train_shards = expand_shards(synthetic_corpus(tmp / "corpus"))
    data = [str(p) for p in train_shards]
    hp = load_preset(preset)["train"]
    for note in notes:
        print("NOTE:", note.replace("**", ""), file=sys.stderr)

    print("measuring the matmul peak…", file=sys.stderr)
    peak = common.matmul_peak()
    run = tmp / "run"
    rows, data_rows = [], []
    for stage in STAGES:
        if stage not in args.stages and not (stage == "clip" and set(args.stages) & {"prior", "decoder"}):
            continue
        batch = args.batch_size or hp[stage]["batch_size"]
        print(f"{stage}: {args.warmup} + {args.steps} steps at batch {batch}…", file=sys.stderr)
        t = time.perf_counter()
        on_device = args.data_on_device and stage in ("decoder", "upsampler")
        opts = TrainOptions(stage=stage, run=run, data=data, preset=preset, max_steps=args.warmup + args.steps, batch_size=batch,
                            device="cpu", log_seconds=0.0, checkpoint_minutes=1e9, **({"data_on_device": True} if on_device else {}))
        summary = train(opts)
        wall = time.perf_counter() - t
        if stage not in args.stages:
            continue  # only trained because the prior and decoder need a CLIP
        lines = [json.loads(x) for x in (run / stage / "metrics.jsonl").read_text().splitlines()]
        step_s = [batch / r["images_per_s"] for r in lines if r["step"] > args.warmup]
        median_s = statistics.median(step_s)
        flops, params = step_flops(stage, preset, data, run, batch)
        rows.append((stage, batch, params, median_s, min(step_s), max(step_s), flops, wall, summary["step"]))
        if stage in ("decoder", "upsampler"):
            print(f"{stage}: data path at batch {args.data_batch}…", file=sys.stderr)
            data_rows.append((stage, data_path_seconds(stage, preset, data, run, args.data_batch, on_device, repeats=5)))

    pf = peak["flops_per_s"]
    body = [*common.machine_lines(peak), common.load_note(load_start), f"- Networks: {arch}; float32 on CPU",
            f"- Data: {len(data)} train shard(s) of `{args.data}`; {args.warmup} warm-up + {args.steps} timed steps per stage, median step"]
    body += [f"- Note: {n}" for n in notes]
    body += ["", "| stage | parameters | batch | s/step (min–max) | images/s | GFLOP/step (fwd+bwd) | GFLOP/s | % of peak | stage wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for stage, batch, params, med, lo, hi, flops, wall, steps in rows:
        body.append(f"| {stage} | {params / 1e6:.2f} M | {batch} | {med:.3f} ({lo:.3f}–{hi:.3f}) | {batch / med:.1f} | {flops / 1e9:.1f} | "
                    f"{flops / med / 1e9:.1f} | {100 * flops / med / pf:.0f}% | {wall:.0f} |")
    body += ["", "Stage wall time includes building the image cache and CLIP embeddings and the final checkpoint."]
    if data_rows:
        where = "tensors in memory (--data-on-device, the CPU as the device)" if args.data_on_device else "the memory-mapped caches"
        body += ["", f"Data path alone (the loss with the network replaced by a zero stub; data from {where}), median of 5 batches of "
                     f"{args.data_batch}:", "", "| stage | s/batch | images/s |", "|---|---|---|"]
        body += [f"| {stage} | {s:.4f} | {args.data_batch / s:,.0f} |" for stage, s in data_rows if s is not None]
    print("\n".join(body))
    if not args.no_results:
        path = common.append_results(f"train — {label}", body)
        print(f"appended to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
