"""Time a whole `unclip` process while other processes keep the CPU busy: does it slow down only in
proportion to the share of the CPU it gets?

The background load is fixed and reproducible: K processes that each spin one core in a pure-Python loop.
For each K, each variant runs the same command `--repeats` times (median reported): a variant is this
checkout, or another checkout given with `--before DIR` (its `unclip_cli` put first on PYTHONPATH), so
thread settings can be compared with the code before them on the same machine in the same run.

"In proportion" on C cores: beside K spinning processes, a fair share for our process is the CPU of one
of K + 1 equal processes, C / (K + 1) cores (at most one core per thread). The "fair share" column is the time
the command would take on exactly that much CPU: its one-thread time on the idle machine (measured first,
OMP_NUM_THREADS=1) times max(1, (K + 1) / C).

    python benchmarks/bench_load.py --before /tmp/before                 # generate -n 4, K = 0 1 2 4
    python benchmarks/bench_load.py --op blend --loads 0 4 --repeats 1 --no-results
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

PROMPT = "an emoji of a red apple"


def spinners(k: int) -> list[subprocess.Popen]:
    """K processes spinning one core each, started before the timed command and kept to its end."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(k)]
    time.sleep(1.0 if k else 0)  # let them take their share before timing starts
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def command(op: str, weights: Path, out: Path, inputs: list[Path]) -> list[str]:
    base = [sys.executable, "-m", "unclip_cli"]
    if op == "generate":
        return [*base, "generate", PROMPT, "-n", "4", "--quality", "default", "--seed", "0", "--quiet",
                "--weights", str(weights), "--out", str(out)]
    return [*base, "blend", str(inputs[0]), str(inputs[1]), "--steps", "5", "--seed", "0", "--quiet",
            "--weights", str(weights), "--out", str(out)]


def blend_inputs(weights: Path, folder: Path) -> list[Path]:
    """Two images for `blend`: generated once by this checkout, so every variant blends the same files."""
    subprocess.run([sys.executable, "-m", "unclip_cli", "generate", "a cat face", "-n", "2", "--quality", "fast", "--seed", "3",
                    "--quiet", "--weights", str(weights), "--out", str(folder)], check=True, capture_output=True)
    return sorted(folder.glob("*.png"))[:2]


def time_once(args: list[str], env: dict, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"`{' '.join(args)}` failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return seconds


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--op", choices=("generate", "blend"), default="generate")
    ap.add_argument("--loads", type=int, nargs="+", default=[0, 1, 2, 4], help="numbers of spinning background processes")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--before", type=Path, help="another checkout to compare with (its unclip_cli first on PYTHONPATH)")
    ap.add_argument("--weights", type=Path, default=Path("weights/emoji"))
    ap.add_argument("--random", help=argparse.SUPPRESS)
    args, load_start, weights, notes = common.start(ap, argv)
    if args.threads:
        raise SystemExit("--threads would override the thread settings under test; leave it out")
    cores = common.machine_info()["cores"] or 1
    here = Path(__file__).resolve().parents[1]
    variants = {"this checkout": here}
    if args.before:
        variants = {f"before ({args.before})": args.before.resolve(), **variants}
    tmp = Path(tempfile.mkdtemp(prefix="unclip-bench-load-"))
    inputs = blend_inputs(weights, tmp / "inputs") if args.op == "blend" else []
    base_env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")}
    rows, idle = [], {}
    try:
        one = {**base_env, "PYTHONPATH": str(here), "OMP_NUM_THREADS": "1"}
        one_thread = statistics.median(time_once(command(args.op, weights, tmp / "out", inputs), one, tmp / "out")
                                       for _ in range(args.repeats))
        print(f"one thread, idle: {one_thread:.1f} s", flush=True)
        for k in args.loads:
            for name, root in variants.items():
                env = {**base_env, "PYTHONPATH": str(root)}
                procs = spinners(k)
                try:
                    times = [time_once(command(args.op, weights, tmp / "out", inputs), env, tmp / "out") for _ in range(args.repeats)]
                finally:
                    stop(procs)
                med = statistics.median(times)
                idle.setdefault(name, med if k == 0 else None)
                ratio = f"{med / idle[name]:.1f}×" if idle.get(name) else ""
                fair = f"{one_thread * max(1.0, (k + 1) / cores):.1f} s" if k else ""
                rows.append(f"| {k} | {name} | {med:.1f} s | {ratio} | {fair} | {', '.join(f'{t:.1f}' for t in times)} |")
                print(rows[-1], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shown = "unclip generate \"…\" -n 4 --quality default" if args.op == "generate" else "unclip blend A B --steps 5 (default quality)"
    body = [
        *common.machine_lines(),
        common.load_note(load_start),
        f"- Workload: `{shown}`, the whole process; background: K processes each spinning one core (`python -c 'while True: pass'`).",
        f"- \"fair share\": the one-thread time on the idle machine ({one_thread:.1f} s, this checkout, OMP_NUM_THREADS=1) "
        f"times max(1, (K + 1) / {cores}): the command on the CPU of one of K + 1 equal processes.",
        *[f"- {n}" for n in notes],
        "",
        "| K spinners | code | median | vs its own K = 0 | fair share | runs (s) |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
    ]
    if args.no_results:
        print("\n".join(body))
    else:
        print(common.append_results(f"load — {args.op} beside K spinning processes", body))


if __name__ == "__main__":
    main()
