"""The full-size Karlo set on this CPU: peak memory and seconds per step of each stage, with and without --offload.

    python benchmarks/bench_karlo_memory.py --workdir ~/unclip-runs/karlo-full

Writes (once) the two hub folders of kakaobrain/karlo-v1-alpha and its image-variation repository with random
weights, built by diffusers' and transformers' classes from the hub's own config files (tests/data/karlo-hub;
3,726 M parameters, float16 as the hub ships them), converts them with `unclip convert karlo`'s code, and then runs
each operation in a fresh process: generate, vary, blend, edit and nudge with --offload on, and generate (and
`--full` the others) with it off. Each run takes 2 steps in every stage (the second super-resolution step is
super_res_last's) and reports the process's peak resident memory (ru_maxrss), the seconds to read each network,
and each stage's seconds per step after its first. Random weights draw nothing, at the speed of real ones.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_run_options, append_results, apply_threads, load_note, machine_lines  # noqa: E402

OPS = ("generate", "vary", "blend", "edit", "nudge")
STEPS = dict(prior_steps=2, decoder_steps=2, upsampler_steps=2)


def child(op: str, offload: str, weights: str) -> dict:
    """One operation in this process; its timings and peak memory as a dict."""
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    from unclip_cli import checkpoint, modelset
    from unclip_cli.engine import Engine
    from unclip_cli.progress import Tick
    from unclip_cli.requests import BlendRequest, EditRequest, GenerateRequest, NudgeRequest, VaryRequest

    loads: dict[str, float] = {}
    materialize = checkpoint.materialize

    def timed_materialize(header, *a, **k):
        t = time.perf_counter()
        out = materialize(header, *a, **k)
        loads[header.path.name] = loads.get(header.path.name, 0.0) + time.perf_counter() - t
        return out

    modelset.checkpoint.materialize = timed_materialize
    ticks: list[tuple[str, int, float]] = []
    img = Image.fromarray((np.random.default_rng(0).random((256, 256, 3)) * 255).astype(np.uint8))
    other = Image.fromarray((np.random.default_rng(1).random((256, 256, 3)) * 255).astype(np.uint8))
    mask = Image.new("L", img.size, 0)
    ImageDraw.Draw(mask).rectangle((64, 64, 192, 192), fill=255)
    dec = dict(decoder_steps=STEPS["decoder_steps"], upsampler_steps=STEPS["upsampler_steps"])
    req = {
        "generate": lambda: GenerateRequest(prompt="a photo of a corgi on a beach", seed=0, **STEPS),
        "vary": lambda: VaryRequest(image=img, seed=0, **dec),
        "blend": lambda: BlendRequest(image_a=img, image_b=other, frames=2, seed=0, **dec),
        "edit": lambda: EditRequest(image=img, mask=mask, prompt="a red hat", seed=0, **STEPS),
        "nudge": lambda: NudgeRequest(image=img, to="a watercolour painting", seed=0, **dec),
    }[op]()
    t0 = time.perf_counter()
    engine = Engine.load(weights, device="cpu", offload=offload)
    engine.run(req, callback=lambda e: isinstance(e, Tick) and ticks.append((e.stage, e.step, time.perf_counter())))  # not its Warnings
    total = time.perf_counter() - t0
    per_step: dict[str, list[float]] = {}
    last: dict[str, tuple[int, float]] = {}
    for stage, step, t in ticks:  # the interval between a stage's consecutive steps: one step, its network already read
        if stage in last and step == last[stage][0] + 1:
            per_step.setdefault(stage, []).append(t - last[stage][1])
        last[stage] = (step, t)
    return {"op": op, "offload": engine.models.offload, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "seconds": total, "loads": loads, "per_step": {k: sum(v) / len(v) for k, v in per_step.items()},
            "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, help="where the random hub folders (7.5 GB) and the converted set (7.5 GB) go")
    ap.add_argument("--full", action="store_true", help="every operation without offloading too (needs ~16 GB free)")
    ap.add_argument("--reduced", action="store_true", help="the test fixture's reduced configs instead (a smoke test of this script)")
    ap.add_argument("--child", nargs=3, metavar=("OP", "OFFLOAD", "SET"), help=argparse.SUPPRESS)
    add_run_options(ap)
    args = ap.parse_args(argv)
    apply_threads(args.threads)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    start_load = os.getloadavg()
    work = Path(args.workdir).expanduser()
    src, var, dst = work / "hub" / "karlo", work / "hub" / "karlo-variations", work / "converted"
    import torch

    from unclip_cli.convert import karlo, random_karlo

    notes = []
    if not (work / "hub" / "done").is_file():
        t = time.perf_counter()
        configs = random_karlo.hub_configs()
        random_karlo.write_hub_folders(random_karlo.reduce(configs) if args.reduced else configs, work / "hub", progress=lambda n: print(f"building {n}…", file=sys.stderr))
        (work / "hub" / "done").write_text("")
        notes.append(f"random hub folders written in {time.perf_counter() - t:.0f} s")
    if not (dst / "MODEL_CARD.md").is_file():
        t = time.perf_counter()
        plan = karlo.prepare(src, var, dtype=torch.float16)
        karlo.write(plan, dst, force=True, progress=lambda n: print(f"converting {n}…", file=sys.stderr))
        notes.append(f"converted ({plan.parameters / 1e6:,.1f} M parameters, float16) in {time.perf_counter() - t:.0f} s")
    runs = [(op, "on") for op in OPS] + [(op, "off") for op in (OPS if args.full else OPS[:1])]
    rows = []
    for op, offload in runs:
        print(f"{op}, offload {offload}…", file=sys.stderr)
        out = subprocess.run([sys.executable, __file__, "--workdir", str(work), "--child", op, offload, str(dst),
                              *(["--threads", str(args.threads)] if args.threads else [])], capture_output=True, text=True)
        if out.returncode:
            rows.append(f"| {op} | {offload} | failed (exit {out.returncode}): {out.stderr.strip().splitlines()[-1][:120] if out.stderr.strip() else ''} | | | |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        loads = ", ".join(f"{k.replace('.safetensors', '')} {v:.1f}" for k, v in r["loads"].items())
        steps = ", ".join(f"{k} {v:.1f}" for k, v in r["per_step"].items())
        rows.append(f"| {op} | {offload} | {r['peak_rss_gib']:.1f} GiB | {r['seconds']:.0f} s | {steps} | {loads} |")
        print(rows[-1], file=sys.stderr)
    body = machine_lines() + [load_note(start_load), *(f"- {n}" for n in notes),
                              "- The full-size set from the hub's real config files, random weights, float16 files, float32 on the CPU; "
                              "one image per run, 2 steps in every stage, each run a fresh process",
                              "", "| operation | --offload | peak memory (RSS) | whole run | s per step, after the first | s to read each network |",
                              "|---|---|---|---|---|---|", *rows]
    print("\n".join(body))
    if not args.no_results:
        print(f"appended to {append_results('karlo full size on the CPU — memory and seconds per step, with and without --offload', body)}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
