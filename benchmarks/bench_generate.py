"""Time `unclip generate "…" -n 4` per --quality preset and --precision, side by side, in one run:

- the whole process (a subprocess, wall clock: start-up, model load, sampling, writing PNGs), median of
  --repeats runs, and its overhead beyond in-process sampling and `import torch` (itself timed in a subprocess).
  Each repeat times all four back to back, so the overhead is a median of --repeats paired differences (load that
  comes and goes moves both sides of a pair), with a distribution-free 95% interval from its order statistics;
- in-process, each stage's share of the sampling time, from the engine's progress-callback timestamps;
- the FLOPs of each stage (torch's FlopCounterMode over one whole generate call, attributed to the
  network that ran them by forward hooks, so every call at its real batch size is counted), and the
  achieved FLOP/s of the sampling loops as a fraction of this machine's fp32 matmul peak, measured in
  the same run (bf16 runs also against the bf16 matmul peak);
- with --eval PRECISION=metrics.json, the quality `unclip eval --precision P` measured for each precision
  (the independent classifier's top-1/top-5 and the sharpness), with the binomial noise of the rates;
- with --diffusers, diffusers' UnCLIPPipeline and unclip on the same random Karlo networks (the test fixture's
  reduced sizes, built from the hub's configs and converted: see bench_karlo.py), same steps, in this run.

Appends a section to benchmarks/RESULTS.md.

    python benchmarks/bench_generate.py                      # weights/emoji, all presets, 3 repeats
    python benchmarks/bench_generate.py --random emoji       # a random set of the emoji architecture
    python benchmarks/bench_generate.py --qualities fast --repeats 1 --no-results
    python benchmarks/bench_generate.py --precisions fp32 bf16 --eval fp32=eval-fp32.json bf16=eval-bf16.json --diffusers
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

import common
from unclip_cli.cli.load import keep_freed_memory

keep_freed_memory()  # the in-process runs reuse freed memory as the console script does (its sampling, not start-up)

import torch  # noqa: E402

PROMPT = "an emoji of a red apple"


def unclip_command() -> list[str]:
    exe = Path(sys.executable).parent / "unclip"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "unclip_cli"]


def time_import_torch(repeats: int, as_unclip: bool = False) -> list[float]:
    """Wall-clock seconds of a Python process that only imports torch; `as_unclip`: that imports it as the unclip
    command does (the cycle collector paused, cli.main) and ends as a successful command does, skipping the
    interpreter's teardown (`os._exit`)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import gc; gc.disable(); import torch, os; gc.freeze(); os._exit(0)" if as_unclip else "import torch"], check=True)
        times.append(time.perf_counter() - t)
    return times


def median_interval(xs: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median of `xs`: the order statistics x(k) and x(n+1-k) with the largest k
    for which a Binomial(n, 1/2) falls below k with probability at most (1 - confidence) / 2 (n = 15: x(4)..x(12))."""
    from math import comb

    xs, n = sorted(xs), len(xs)
    k, tail = 0, 0.0
    while k < n // 2:
        nxt = tail + comb(n, k) / 2 ** n
        if nxt > (1 - confidence) / 2:
            break
        k, tail = k + 1, nxt
    return (xs[k - 1], xs[n - k]) if k else (xs[0], xs[-1])


def time_process(weights: Path, quality: str, n: int, prompt: str, repeats: int, precision: str = "fp32") -> tuple[list[float], str]:
    """Wall-clock seconds of the whole `unclip generate` process, each run into a fresh output folder."""
    times = []
    shown = ""
    for _ in range(repeats):
        out = Path(tempfile.mkdtemp(prefix="unclip-bench-out-"))
        args = [*unclip_command(), "generate", prompt, "-n", str(n), "--quality", quality, "--seed", "0", "--quiet",
                "--weights", str(weights), "--out", str(out), "--precision", precision]
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


def time_stages(engine, quality: str, n: int, prompt: str, precision: str = "fp32") -> tuple[dict[str, float], dict[str, int]]:
    """Seconds per stage of one in-process generate call, and each network's calls. The time since the
    previous progress event goes to the stage that reports it (so text encoding counts towards the
    prior's first step, and the upsampler's input interpolation towards its first step)."""
    from unclip_cli.progress import Warnings
    from unclip_cli.requests import GenerateRequest

    spent: dict[str, float] = {}
    last = [time.perf_counter()]

    def cb(tick):
        if isinstance(tick, Warnings):  # said before the first step: its time counts to the prior's first step
            return
        now = time.perf_counter()
        key = stage_of(tick.stage)
        spent[key] = spent.get(key, 0.0) + now - last[0]
        last[0] = now

    with common.NetworkFlops(networks(engine)) as nf:
        start = last[0] = time.perf_counter()
        engine.run(GenerateRequest(prompt=prompt, n=n, seed=0, quality=quality, precision=precision), callback=cb)
        end = time.perf_counter()
    spent["finish"] = end - last[0]  # after the last sampling step: to PIL
    spent["total"] = end - start
    return spent, nf.calls


def quality_of(path: str) -> dict:
    """The numbers the precision choice rests on, from an `unclip eval` metrics file."""
    import json

    m = json.loads(Path(path).read_text())
    cls, gen = m["metrics"]["classifier"]["generated"], m["metrics"]["generate"]
    n = m["metrics"]["classifier"]["prompts"]["en"] + m["metrics"]["classifier"]["prompts"]["zh"]
    mean = lambda k: (cls["en"][k] + cls["zh"][k]) / 2  # noqa: E731  (as many English as Chinese prompts)
    return {"top1": mean("top1"), "top5": mean("top5"), "n": n, "sharpness": m["metrics"]["sharpness"]["share_of_real"][0],
            "frechet": gen["frechet_clip"], "precision": m.get("precision", "fp32"), "path": path}


def binomial_se(p: float, n: int) -> float:
    return (p * (1 - p) / n) ** 0.5


def diffusers_ratio(n: int, steps, repeats: int, precisions) -> tuple[list[str], list[tuple]]:
    """unclip and diffusers' UnCLIPPipeline on the same random reduced-Karlo networks (bench_karlo.prepare), per precision."""
    import bench_karlo

    with tempfile.TemporaryDirectory(prefix="bench-generate-karlo-") as work:
        pipe, dst, facts = bench_karlo.prepare("reduced", "cpu", torch.float32, Path(work))
        params = {name: sum(t.numel() for t in getattr(pipe, name).parameters()) / 1e6 for name in ("prior", "decoder", "super_res_first")}
        # diffusers' side in fp32 only: under CPU bf16 autocast its UnCLIPPipeline stops at the super-res stage's
        # antialiased bicubic resize, which has no bf16 kernel (torch 2.14)
        print("diffusers comparison: diffusers…", file=sys.stderr)
        theirs = bench_karlo.time_diffusers(pipe, "cpu", n, steps, repeats)
        rows = []
        for p in precisions:
            print(f"diffusers comparison: unclip {p}…", file=sys.stderr)
            ours, _, size, _ = bench_karlo.time_unclip(dst, "cpu", torch.float32, n, steps, repeats, precision=p)
            rows.append((p, ours, theirs))
    head = [f"- Same networks both ways: diffusers' UnCLIPPipeline built from the hub's Karlo configs at the test fixture's "
            f"reduced sizes (prior {params['prior']:.1f} M, decoder {params['decoder']:.1f} M, super-res {params['super_res_first']:.1f} M "
            f"parameters ×2; {size} px), converted by `unclip convert karlo`; {n} images, steps {'/'.join(map(str, steps))}, "
            f"median of {repeats} in-process runs after a warm-up; diffusers in fp32 (its pipeline fails under CPU bf16 "
            "autocast: the antialiased bicubic resize has no bf16 kernel)"]
    return head, rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="weights/emoji", help="model set to time (default: weights/emoji)")
    ap.add_argument("--random", metavar="PRESET", help="time a randomly initialised set of this preset instead (e.g. emoji)")
    ap.add_argument("--qualities", nargs="+", default=["fast", "default", "best"], choices=["fast", "default", "best"])
    ap.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=3, help="in-process and whole-process runs per preset (medians reported)")
    ap.add_argument("-n", type=int, default=4, help="images per command")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--eval", nargs="+", default=[], metavar="PRECISION=FILE",
                    help="metrics of `unclip eval --precision PRECISION` for the quality columns")
    ap.add_argument("--diffusers", action="store_true", help="also time diffusers' UnCLIPPipeline against unclip on the same networks")
    ap.add_argument("--diffusers-steps", type=int, nargs=3, default=(25, 25, 7), metavar=("PRIOR", "DECODER", "SUPER_RES"))
    args, load_start, weights, notes = common.start(ap, argv)
    evals = {k: quality_of(v) for k, v in (e.split("=", 1) for e in args.eval)}

    from unclip_cli.device import cpu_has_bf16
    from unclip_cli.engine import Engine
    from unclip_cli.requests import QUALITY, GenerateRequest

    print("measuring the matmul peaks…", file=sys.stderr)
    peak = common.matmul_peak()
    peaks = {"fp32": peak["flops_per_s"]}
    if "bf16" in args.precisions:
        peaks["bf16"] = common.matmul_peak(dtype=torch.bfloat16)["flops_per_s"]
    t = time.perf_counter()
    engine = Engine.load(weights, device="cpu")
    load_s = time.perf_counter() - t
    for p in args.precisions:  # warm-up: first-call allocations, thread pool, each precision's kernels
        engine.run(GenerateRequest(prompt=args.prompt, seed=0, quality="fast", precision=p))
    torch_import, torch_bare = [], []

    rows = []
    for q in args.qualities:
        print(f"{q}: counting FLOPs per network call…", file=sys.stderr)
        per_call = flops_per_call(engine, args.n, args.prompt, q)
        for p in args.precisions:
            print(f"{q}, {p}: timing {args.repeats} paired repeats (import torch plainly and as unclip does, the "
                  "whole process, the in-process run)…", file=sys.stderr)
            runs, proc, over, over_bare = [], [], [], []
            for _ in range(args.repeats):
                imp1, bare1 = time_import_torch(1)[0], time_import_torch(1, as_unclip=True)[0]
                p1, shown = time_process(weights, q, args.n, args.prompt, 1, p)
                runs.append(time_stages(engine, q, args.n, args.prompt, p))
                proc.append(p1[0])
                torch_import.append(imp1)
                torch_bare.append(bare1)
                over.append(p1[0] - runs[-1][0]["total"] - imp1)
                over_bare.append(p1[0] - runs[-1][0]["total"] - bare1)
            totals = [r[0]["total"] for r in runs]
            stages, net_calls = sorted(runs, key=lambda r: r[0]["total"])[(len(runs) - 1) // 2]  # the (lower) median run
            flops, calls = {}, {}
            for k, c in net_calls.items():
                flops[stage_of(k)] = flops.get(stage_of(k), 0) + per_call.get(k, 0) * c
                calls[stage_of(k)] = calls.get(stage_of(k), 0) + c
            rows.append((q, p, flops, calls, totals, stages, proc, shown, over, over_bare))

    ups = len(engine.models.upsamplers)
    imp, bare = statistics.median(torch_import), statistics.median(torch_bare)
    body = [*common.machine_lines(peak), common.load_note(load_start),
            f"- Model: `{weights}` ({engine.name}, hash {engine.models.model_hash}), {engine.base_size} px base → "
            f"{engine.image_size} px, {ups} upsampler stage{'s' if ups != 1 else ''}; on CPU; model load in-process {load_s:.2f} s",
            f"- This CPU computes bfloat16 natively: {'yes' if cpu_has_bf16() else 'no'}"
            + (f"; bf16 matmul peak in this run {peaks['bf16'] / 1e9:.1f} GFLOP/s" if "bf16" in peaks else ""),
            f"- `python -c 'import torch'`: {imp:.2f} s (median of {len(torch_import)} processes); imported as the unclip command "
            f"does, with the cycle collector paused and `os._exit(0)` at the end: {bare:.2f} s",
            f"- Prompt: “{args.prompt}”, -n {args.n}, seed 0"]
    body += [f"- Note: {n}" for n in notes]
    body += ["", "Whole process (`unclip generate … -n %d --quality Q --precision P`, wall clock) and in-process generate call, "
             "each the median of %d runs (min–max in brackets), with the median in-process run split by stage. Overhead = "
             "process − in-process − import torch, per repeat (the four were timed back to back), as the median of the "
             "repeats with its 95%% interval in brackets (the issue's target: at most 0.5 s); unclip's own: the same "
             "against torch imported as unclip imports it, which is what unclip's own start-up and writing cost:" % (args.n, args.repeats), "",
             "| quality | precision | steps prior/decoder/upsampler | process s | in-process s | overhead s | unclip's own s | prior | decoder | upsampler | other |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for q, p, flops, calls, totals, st, proc, shown, over, over_bare in rows:
        s = QUALITY[q]
        share = lambda k: f"{100 * st.get(k, 0.0) / st['total']:.0f}%"  # noqa: E731
        other = st["total"] - sum(st.get(k, 0.0) for k in ("prior", "decoder", "upsampler"))
        ci = lambda xs: "%.2f [%.2f–%.2f]" % (statistics.median(xs), *median_interval(xs))  # noqa: E731
        body.append(f"| {q} | {p} | {s.prior}/{s.decoder}/{s.upsampler} | {statistics.median(proc):.2f} [{min(proc):.2f}–{max(proc):.2f}] | "
                    f"{statistics.median(totals):.2f} [{min(totals):.2f}–{max(totals):.2f}] | {ci(over)} | {ci(over_bare)} | "
                    f"{share('prior')} | {share('decoder')} | {share('upsampler')} | {100 * other / st['total']:.0f}% |")
    if len(args.precisions) > 1:
        body += ["", "Speed-up of bf16 over fp32 (in-process sampling, medians): "
                 + ", ".join(f"{q} {statistics.median(a[4]) / statistics.median(b[4]):.2f}×"
                             for q in args.qualities for a in rows for b in rows
                             if a[0] == b[0] == q and a[1] == "fp32" and b[1] == "bf16")]
    body += ["", "Achieved FLOP/s of the sampling loops against the matmul peak of the precision (fp32 "
             f"{peaks['fp32'] / 1e9:.1f} GFLOP/s" + (f", bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s" if "bf16" in peaks else "")
             + "): FLOPs of one call of each network (FlopCounterMode over a whole generate call, divided by its calls; guidance "
             "doubles the prior and decoder batches, the prior samples 2 candidates per image and the decoder the quality's "
             "candidates) times its calls, over the stage's time in the median in-process run:", "",
             "| quality | precision | stage | network calls | GFLOP | seconds | GFLOP/s | % of peak |", "|---|---|---|---|---|---|---|---|"]
    for q, p, flops, calls, totals, st, proc, shown, *_ in rows:
        loop_f, loop_t, pf = 0, 0.0, peaks[p]
        for k in ("prior", "decoder", "upsampler"):
            if k not in flops:
                continue
            sec = st.get(k, 0.0)
            loop_f, loop_t = loop_f + flops[k], loop_t + sec
            body.append(f"| {q} | {p} | {k} | {calls[k]} | {flops[k] / 1e9:.2f} | {sec:.2f} | {flops[k] / sec / 1e9:.1f} | {100 * flops[k] / sec / pf:.0f}% |")
        body.append(f"| {q} | {p} | **all sampling loops** | | {loop_f / 1e9:.2f} | {loop_t:.2f} | {loop_f / loop_t / 1e9:.1f} | "
                    f"**{100 * loop_f / loop_t / pf:.0f}%** |")
    if evals:
        body += ["", "Quality per precision, from `unclip eval` (full mode: the held-out prompts, seed 0, quality default; the "
                 "independent classifier's top-1/top-5 over English and Chinese prompts, sharpness as the 8–16 px band's share of "
                 "real images'); ± is one binomial standard error of a rate:", "",
                 "| precision | prompts | classifier top-1 | top-5 | sharpness (share of real) | Fréchet CLIP | metrics |", "|---|---|---|---|---|---|---|"]
        for p, e in evals.items():
            body.append(f"| {p} | {e['n']} | {e['top1']:.3f} ± {binomial_se(e['top1'], e['n']):.3f} | {e['top5']:.3f} ± "
                        f"{binomial_se(e['top5'], e['n']):.3f} | {e['sharpness']:.3f} | {e['frechet']:.3f} | `{e['path']}` |")
    if args.diffusers:
        head, drows = diffusers_ratio(args.n, args.diffusers_steps, args.repeats, args.precisions)
        body += ["", "unclip against diffusers' UnCLIPPipeline:", *head, "",
                 "| unclip precision | unclip s | diffusers (fp32) s | diffusers / unclip |", "|---|---|---|---|"]
        for p, ours, theirs in drows:
            body.append(f"| {p} | {ours[0]:.2f} | {theirs[0]:.2f} | {theirs[0] / ours[0]:.2f}× |")
    body += ["", "Commands timed: " + "; ".join(f"`{r[7]}`" for r in rows) + " (fresh temporary --out folder each run)."]
    text = "\n".join(body)
    print(text)
    if not args.no_results:
        path = common.append_results(f"generate — {engine.name}", body)
        print(f"appended to {path}", file=sys.stderr)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
