"""Shared pieces of the benchmark scripts: the machine, its matmul peak, FLOP counting, the weights to
time, and appending to RESULTS.md. Run the scripts from the repository root (`python benchmarks/...`)."""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "RESULTS.md"
sys.path.insert(0, str(REPO))

from unclip_cli.evaluate import machine_info  # noqa: E402


def matmul_peak(n: int = 2048, repeats: int = 8, dtype: torch.dtype = torch.float32) -> dict:
    """The machine's matmul throughput in `dtype` (fp32 by default): the best of `repeats` (n x n) @ (n x n) products."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up: thread pool, caches
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return {"flops_per_s": 2 * n**3 / best, "n": n, "repeats": repeats, "threads": torch.get_num_threads()}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def timed(fn, device: str, repeats: int) -> tuple[float, list[float]]:
    """(median seconds, each run's) of `repeats` calls after a warm-up (kernels, allocator, caches), the device synced."""
    import statistics

    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def flop_counter():
    """torch's FlopCounterMode, taught the CPU flash-attention kernels it does not count by itself
    (scaled_dot_product_attention on CPU dispatches to them, and they would count as zero)."""
    import torch.utils.flop_counter as fc

    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = \
            lambda q, k, v, *args, out_shape=None, **kw: fc.sdpa_flop_count(q, k, v)
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = \
            lambda g, q, k, v, *args, out_shape=None, **kw: fc.sdpa_backward_flop_count(g, q, k, v)
    return fc.FlopCounterMode(display=False, custom_mapping=mapping)


class NetworkFlops:
    """Count the calls of named networks and, inside a FlopCounterMode (`counter`), attribute the FLOPs
    counted to the network that ran them: forward hooks read the counter's running total before and
    after each call. With `counter=None` only calls are counted (cheap enough for timed runs)."""

    def __init__(self, networks: dict[str, torch.nn.Module], counter=None):
        self.counter, self.flops, self.calls, self.handles = counter, {k: 0 for k in networks}, {k: 0 for k in networks}, []
        total = (lambda: counter.get_total_flops()) if counter is not None else (lambda: 0)
        for name, net in networks.items():
            start = {}
            self.handles.append(net.register_forward_pre_hook(lambda m, a, start=start: start.__setitem__("f", total())))
            self.handles.append(net.register_forward_hook(lambda m, a, o, name=name, start=start: self._done(name, total() - start["f"])))

    def _done(self, name: str, flops: int) -> None:
        self.flops[name] += flops
        self.calls[name] += 1

    def __enter__(self) -> "NetworkFlops":
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()


def pick_weights(weights: str | None, random_preset: str | None) -> tuple[Path, list[str]]:
    """The model set to time and notes about it: --random PRESET writes a randomly initialised set (its
    speed is the trained model's); a missing --weights folder falls back to the tiny random set."""
    from unclip_cli.modelset import write_random_model_set

    notes = []
    if random_preset:
        path = write_random_model_set(Path(tempfile.mkdtemp(prefix="unclip-bench-")) / f"random-{random_preset}", preset=random_preset)
        notes.append(f"timing a randomly initialised `{random_preset}` model set (same architecture, so the same speed as a "
                     f"trained one; images are noise)")
        return path, notes
    path = Path(weights or "weights/emoji")
    if path.is_dir() and any(path.glob("*.safetensors")):
        return path, notes
    fallback = write_random_model_set(Path(tempfile.mkdtemp(prefix="unclip-bench-")) / "random-tiny", preset="tiny")
    notes.append(f"**{path} has no model set: timing a tiny random model set instead. These numbers say nothing about the "
                 f"shipped model; rerun with --weights DIR (or --random emoji).**")
    return fallback, notes


def command_line() -> str:
    return shlex.join(["python", *sys.argv])


def _cpu_seconds() -> tuple[float, float, float] | None:
    """(CPU-seconds the whole machine has been busy, its CPU-seconds in all, this process's own with the children it
    waited for), from /proc/stat and os.times; None where there is no /proc/stat."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            jiffies = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz, t = os.sysconf("SC_CLK_TCK"), os.times()
    idle = jiffies[3] + jiffies[4]  # idle and iowait
    return (sum(jiffies) - idle) / hz, sum(jiffies) / hz, t.user + t.system + t.children_user + t.children_system


_AT_IMPORT = _cpu_seconds()  # every benchmark imports this module first
# The share of the machine's CPU time used by other processes above which a run is marked busy. Measured on the 2-core
# machine: 0.1% during a 20-minute bench_generate run with nothing else started and 0.2% over 20 s idle; 47% beside
# one process spinning a core (whose 1-minute load average still said 0.7); 2.5% beside one busy 5% of a core.
OTHERS_BUSY = 0.05


def load_note(start: tuple[float, float, float]) -> str:
    """How much other work ran beside the benchmark, which skews timings: the CPU time that processes other than this
    one and its children used since it started, as a share of the machine's, and the 1-minute load averages at the
    start and end. The load average counts the benchmark's own threads (an idle 2-core machine ends a bf16 run at
    1.7) and the minute before it started, so it alone marked every run busy; the share does not."""
    end, cores = os.getloadavg(), machine_info()["cores"] or 1
    line = f"- Load average (1 min) at start / end: {start[0]:.1f} / {end[0]:.1f} on {cores} cores"
    now = _cpu_seconds()
    if _AT_IMPORT is None or now is None:  # no /proc/stat: the load average is all there is
        busy = max(start[0], end[0]) > 0.5 * cores
    else:
        used, total, own = (b - a for a, b in zip(_AT_IMPORT, now))
        share = max(0.0, used - own) / total if total > 0 else 0.0
        line += f"; other processes used {100 * share:.1f}% of the machine's CPU time during the run"
        busy = share > OTHERS_BUSY
    return line + (" — **the machine was busy with other work; timings are pessimistic and noisy**" if busy else "")


def machine_lines(peak: dict | None = None) -> list[str]:
    m = machine_info()
    lines = [
        f"- Date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"- Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), torch {m['torch']}, Python {m['python']}, {m['platform']}",
    ]
    if peak:
        lines.append(f"- fp32 matmul peak, measured in this run: {peak['flops_per_s'] / 1e9:.1f} GFLOP/s "
                     f"(best of {peak['repeats']} {peak['n']}×{peak['n']} products)")
    lines.append(f"- Command: `{command_line()}`")
    return lines


def append_results(title: str, body: list[str], path: Path = RESULTS) -> Path:
    """Append one section to RESULTS.md (created with a header if absent)."""
    if not path.exists():
        path.write_text("# Benchmark results\n\nWritten by the scripts in `benchmarks/`; each run appends a section, newest last. "
                        "Each section names the machine, the date, the load average and the exact command.\n")
    with open(path, "a") as f:
        f.write("\n## " + title + "\n\n" + "\n".join(body).rstrip() + "\n")
    return path


def add_run_options(ap) -> None:
    """The options every benchmark shares."""
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice, one per core)")
    ap.add_argument("--no-results", action="store_true", help="print only; do not append to benchmarks/RESULTS.md")


def apply_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # for timed subprocesses



def compile_bytecode() -> None:
    """Write unclip's bytecode before anything is timed, as an install has it (pip compiles on install, an editable
    install on first run): in a fresh clone run with PYTHONDONTWRITEBYTECODE=1 every timed process compiled unclip's
    modules anew (importing the engine took 0.10-0.16 s instead of 0.04-0.06 s on the 2-core machine, issue 25)."""
    import compileall

    import unclip_cli

    compileall.compile_dir(Path(unclip_cli.__file__).parent, quiet=2)


def start(ap, argv=None):
    """Parse a benchmark's arguments (with the shared run options), apply --threads and pick its weights,
    printing the notes: -> (args, load average at start, weights folder, notes for the results)."""
    add_run_options(ap)
    args = ap.parse_args(argv)
    load_start = os.getloadavg()
    apply_threads(args.threads)
    compile_bytecode()
    weights, notes = pick_weights(args.weights, args.random)
    for note in notes:
        print("NOTE:", note.replace("**", ""), file=sys.stderr)
    return args, load_start, weights, notes
