"""Time `unclip generate "…" -n 4` per --quality preset, side by side, in one run:

- the whole process (a subprocess, wall clock: start-up, model load, sampling, writing PNGs), median of
  --repeats runs;
- in-process, each stage's share of the sampling time, from the engine's progress-callback timestamps;
- the FLOPs of each stage (torch's FlopCounterMode over one whole generate call, attributed to the
  network that ran them by forward hooks, so every call at its real batch size is counted), and the
  achieved FLOP/s of the sampling loops as a fraction of this machine's fp32 matmul peak, measured in
  the same run.

Appends a section to benchmarks/RESULTS.md.

    python benchmarks/bench_generate.py                      # weights/emoji, all presets, 3 repeats
    python benchmarks/bench_generate.py --random emoji       # a random set of the emoji architecture
    python benchmarks/bench_generate.py --qualities fast --repeats 1 --no-results
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import common

PROMPT = "an emoji of a red apple"


def unclip_command() -> list[str]:
    exe = Path(sys.executable).parent / "unclip"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "unclip_cli"]


def time_process(weights: Path, quality: str, n: int, prompt: str, repeats: int) -> tuple[list[float], str]:
    """Wall-clock seconds of the whole `unclip generate` process, each run into a fresh output folder."""
    times = []
    shown = ""
    for _ in range(repeats):
        out = Path(tempfile.mkdtemp(prefix="unclip-bench-out-"))
        args = [*unclip_command(), "generate", prompt, "-n", str(n), "--quality", quality, "--seed", "0", "--quiet",
                "--weights", str(weights), "--out", str(out)]
        shown = "unclip " + " ".join(f'"{a}"' if " " in a else a for a in args[len(unclip_command()):])
        t = time.perf_counter()
        proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "UNCLIP_DEBUG": "1"})
        times.append(time.perf_counter() - t)
        shutil.rmtree(out, ignore_errors=True)
        if proc.returncode != 0:
            raise SystemExit(f"`{shown}` failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return times, shown


def stage_of(name: str) -> str:
    return "upsampler" if name.startswith("upsampler") else name


def networks(engine) -> dict[str, torch.nn.Module]:
    m = engine.models
    nets = {"prior": m.prior.model, "decoder": m.decoder.model}
    nets.update({f"upsampler{i}": u.model for i, u in enumerate(m.upsamplers)})
    return nets


def flops_per_call(engine, n: int, prompt: str, quality: str) -> dict[str, float]:
    """FLOPs of one call of each network at this -n and quality (the decoder's batch grows with the
    quality's decoder candidates; the step counts do not matter), from one generate call under
    FlopCounterMode with one step per stage."""
    from unclip_cli.requests import QUALITY, GenerateRequest

    one_step = GenerateRequest(prompt=prompt, n=n, seed=0, prior_steps=1, decoder_steps=1, upsampler_steps=1,
                               decoder_candidates=QUALITY[quality].decoder_candidates)
    with common.flop_counter() as counter, common.NetworkFlops(networks(engine), counter) as nf:
        engine.run(one_step)
    return {k: nf.flops[k] / nf.calls[k] for k in nf.flops if nf.calls[k]}


def time_stages(engine, quality: str, n: int, prompt: str) -> tuple[dict[str, float], dict[str, int]]:
    """Seconds per stage of one in-process generate call, and each network's calls. The time since the
    previous progress event goes to the stage that reports it (so text encoding counts towards the
    prior's first step, and the upsampler's input interpolation towards its first step)."""
    from unclip_cli.requests import GenerateRequest

    spent: dict[str, float] = {}
    last = [time.perf_counter()]

    def cb(tick):
        now = time.perf_counter()
        key = stage_of(tick.stage)
        spent[key] = spent.get(key, 0.0) + now - last[0]
        last[0] = now

    with common.NetworkFlops(networks(engine)) as nf:
        start = last[0] = time.perf_counter()
        engine.run(GenerateRequest(prompt=prompt, n=n, seed=0, quality=quality), callback=cb)
        end = time.perf_counter()
    spent["finish"] = end - last[0]  # after the last sampling step: to PIL
    spent["total"] = end - start
    return spent, nf.calls


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="weights/emoji", help="model set to time (default: weights/emoji)")
    ap.add_argument("--random", metavar="PRESET", help="time a randomly initialised set of this preset instead (e.g. emoji)")
    ap.add_argument("--qualities", nargs="+", default=["fast", "default", "best"], choices=["fast", "default", "best"])
    ap.add_argument("--repeats", type=int, default=3, help="in-process and whole-process runs per preset (medians reported)")
    ap.add_argument("-n", type=int, default=4, help="images per command")
    ap.add_argument("--prompt", default=PROMPT)
    args, load_start, weights, notes = common.start(ap, argv)

    from unclip_cli.engine import Engine
    from unclip_cli.requests import QUALITY, GenerateRequest

    print("measuring the matmul peak…", file=sys.stderr)
    peak = common.matmul_peak()
    t = time.perf_counter()
    engine = Engine.load(weights, device="cpu")
    load_s = time.perf_counter() - t
    engine.run(GenerateRequest(prompt=args.prompt, seed=0, quality="fast"))  # warm-up: first-call allocations, thread pool

    rows = []
    for q in args.qualities:
        print(f"{q}: counting FLOPs per network call…", file=sys.stderr)
        per_call = flops_per_call(engine, args.n, args.prompt, q)
        print(f"{q}: timing {args.repeats} in-process runs and {args.repeats} whole processes…", file=sys.stderr)
        runs = sorted((time_stages(engine, q, args.n, args.prompt) for _ in range(args.repeats)), key=lambda r: r[0]["total"])
        stages, net_calls = runs[(len(runs) - 1) // 2]  # the run with the (lower) median total
        flops, calls = {}, {}
        for k, c in net_calls.items():
            flops[stage_of(k)] = flops.get(stage_of(k), 0) + per_call.get(k, 0) * c
            calls[stage_of(k)] = calls.get(stage_of(k), 0) + c
        proc, shown = time_process(weights, q, args.n, args.prompt, args.repeats)
        rows.append((q, flops, calls, [r[0]["total"] for r in runs], stages, proc, shown))

    pf = peak["flops_per_s"]
    ups = len(engine.models.upsamplers)
    body = [*common.machine_lines(peak), common.load_note(load_start),
            f"- Model: `{weights}` ({engine.name}, hash {engine.models.model_hash}), {engine.base_size} px base → "
            f"{engine.image_size} px, {ups} upsampler stage{'s' if ups != 1 else ''}; float32 on CPU; model load in-process {load_s:.2f} s",
            f"- Prompt: “{args.prompt}”, -n {args.n}, seed 0"]
    body += [f"- Note: {n}" for n in notes]
    body += ["", "Whole process (`unclip generate … -n %d --quality Q`, wall clock) and in-process generate call, each the "
             "median of %d runs (min–max in brackets), with the median in-process run split by stage:" % (args.n, args.repeats), "",
             "| quality | steps prior/decoder/upsampler | process s | in-process s | prior | decoder | upsampler | other |",
             "|---|---|---|---|---|---|---|---|"]
    for q, flops, calls, totals, st, proc, shown in rows:
        s = QUALITY[q]
        share = lambda k: f"{100 * st.get(k, 0.0) / st['total']:.0f}%"  # noqa: E731
        other = st["total"] - sum(st.get(k, 0.0) for k in ("prior", "decoder", "upsampler"))
        body.append(f"| {q} | {s.prior}/{s.decoder}/{s.upsampler} | {statistics.median(proc):.2f} [{min(proc):.2f}–{max(proc):.2f}] | "
                    f"{st['total']:.2f} [{min(totals):.2f}–{max(totals):.2f}] | {share('prior')} | {share('decoder')} | {share('upsampler')} | {100 * other / st['total']:.0f}% |")
    body += ["", f"Achieved FLOP/s of the sampling loops against the matmul peak ({pf / 1e9:.1f} GFLOP/s): FLOPs of one call of "
             "each network (FlopCounterMode over a whole generate call, divided by its calls; guidance doubles the prior and "
             "decoder batches, the prior samples 2 candidates per image and the decoder the quality's candidates) times its calls, over the stage's time in the "
             "median in-process run:", "",
             "| quality | stage | network calls | GFLOP | seconds | GFLOP/s | % of peak |", "|---|---|---|---|---|---|---|"]
    for q, flops, calls, totals, st, proc, shown in rows:
        loop_f, loop_t = 0, 0.0
        for k in ("prior", "decoder", "upsampler"):
            if k not in flops:
                continue
            sec = st.get(k, 0.0)
            loop_f, loop_t = loop_f + flops[k], loop_t + sec
            body.append(f"| {q} | {k} | {calls[k]} | {flops[k] / 1e9:.2f} | {sec:.2f} | {flops[k] / sec / 1e9:.1f} | {100 * flops[k] / sec / pf:.0f}% |")
        body.append(f"| {q} | **all sampling loops** | | {loop_f / 1e9:.2f} | {loop_t:.2f} | {loop_f / loop_t / 1e9:.1f} | "
                    f"**{100 * loop_f / loop_t / pf:.0f}%** |")
    body += ["", "Commands timed: " + "; ".join(f"`{r[6]}`" for r in rows) + " (fresh temporary --out folder each run)."]
    text = "\n".join(body)
    print(text)
    if not args.no_results:
        path = common.append_results(f"generate — {engine.name}", body)
        print(f"appended to {path}", file=sys.stderr)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
