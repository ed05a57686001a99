"""Time `unclip serve` on `n=1` generations, beside the CLI's per-image time, in one run:

- the CLI: `unclip generate PROMPT -n 1 --quality Q` as a whole process (start-up, model load, sampling,
  PNG), median of --repeats runs; and the same request run in-process by the engine (the model's own time);
- the server: `unclip serve` started as its own process on 127.0.0.1 at a free port, sent --requests
  generations (`n=1`, `response_format=b64_json`, seeds 0, 1, ...) by 1 and by 4 concurrent clients, after
  one warm-up request: requests/s over the batch, and p50/p95 latency as each client sees it. One worker
  runs the engine, so 4 clients should get the same requests/s as 1 and about 4 times the latency; the
  difference between the server's latency with 1 client and the in-process time is the HTTP, queue and
  PNG overhead.

Appends a section to benchmarks/RESULTS.md.

    python benchmarks/bench_serve.py                         # weights/emoji, quality default, 16 requests per level
    python benchmarks/bench_serve.py --quality fast --requests 8 --no-results
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import common

PROMPT = "an emoji of a red apple"


def unclip_command() -> list[str]:
    exe = Path(sys.executable).parent / "unclip"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "unclip_cli"]


def time_cli(weights: Path, quality: str, prompt: str, repeats: int) -> tuple[list[float], str]:
    """Wall-clock seconds of whole `unclip generate -n 1` processes, each into a fresh output folder."""
    times, shown = [], ""
    for i in range(repeats):
        with tempfile.TemporaryDirectory(prefix="unclip-bench-out-") as out:
            args = ["generate", prompt, "-n", "1", "--quality", quality, "--seed", str(i), "--quiet", "--weights", str(weights), "--out", out]
            shown = "unclip " + " ".join(f'"{a}"' if " " in a else a for a in args[:-1]) + " DIR"
            t = time.perf_counter()
            proc = subprocess.run([*unclip_command(), *args], capture_output=True, text=True, env={**os.environ, "UNCLIP_DEBUG": "1"})
            times.append(time.perf_counter() - t)
        if proc.returncode != 0:
            raise SystemExit(f"`{shown}` failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return times, shown


def time_engine(weights: Path, quality: str, prompt: str, repeats: int) -> list[float]:
    """Seconds of in-process engine runs of the same request (after a warm-up run)."""
    from unclip_cli.engine import Engine
    from unclip_cli.requests import GenerateRequest

    engine = Engine.load(weights, device="cpu")
    engine.run(GenerateRequest(prompt=prompt, n=1, seed=0, quality="fast"))
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        engine.run(GenerateRequest(prompt=prompt, n=1, seed=i, quality=quality))
        times.append(time.perf_counter() - t)
    return times


class Served:
    """`unclip serve` as a child process on 127.0.0.1 at a free port."""

    def __init__(self, weights: Path, max_queue: int):
        args = [*unclip_command(), "serve", "--weights", str(weights), "--port", "0", "--device", "cpu", "--quiet",
                "--max-queue", str(max_queue)]
        self.proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
        self.url, seen, deadline = None, [], time.monotonic() + 300
        while self.url is None and time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stderr], [], [], max(0.0, deadline - time.monotonic()))
            line = self.proc.stderr.readline() if ready else ""
            if not line:
                break
            seen.append(line)
            if line.startswith("Serving on "):
                self.url = line.split()[2].rstrip("/")
        if self.url is None:
            self.proc.kill()
            raise SystemExit("unclip serve did not start:\n" + "".join(seen))
        self.command = "unclip " + " ".join(args[len(unclip_command()):])

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def load(url: str, clients: int, requests: int, quality: str, prompt: str) -> dict:
    """`requests` generations from `clients` concurrent clients: wall time, each latency, and 503s."""
    import httpx

    latencies, busy, failures = [], 0, []
    lock, next_seed = threading.Lock(), iter(range(requests))

    def client() -> None:
        nonlocal busy
        with httpx.Client(base_url=url, timeout=600, trust_env=False) as c:
            while True:
                with lock:
                    seed = next(next_seed, None)
                if seed is None:
                    return
                t = time.perf_counter()
                r = c.post("/v1/images/generations", json={"prompt": prompt, "n": 1, "seed": seed, "quality": quality,
                                                           "response_format": "b64_json"})
                took = time.perf_counter() - t
                with lock:
                    if r.status_code == 200:
                        latencies.append(took)
                    elif r.status_code == 503:
                        busy += 1
                    else:
                        failures.append(f"{r.status_code} {r.text[:200]}")

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if failures:
        raise SystemExit("requests failed: " + "; ".join(failures[:3]))
    return {"clients": clients, "ok": len(latencies), "busy": busy, "wall": wall, "latencies": latencies}


# The API's quality names for the presets (the server maps them back).
API_QUALITY = {"fast": "low", "default": "standard", "best": "high"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="weights/emoji", help="model set to time (default: weights/emoji)")
    ap.add_argument("--random", metavar="PRESET", help="time a randomly initialised set of this preset instead (e.g. emoji)")
    ap.add_argument("--quality", default="default", choices=["fast", "default", "best"])
    ap.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4], help="concurrency levels")
    ap.add_argument("--repeats", type=int, default=3, help="CLI processes and in-process runs (medians reported)")
    ap.add_argument("--prompt", default=PROMPT)
    args, load_start, weights, notes = common.start(ap, argv)
    print(f"CLI: {args.repeats} whole processes and in-process runs…", file=sys.stderr)
    cli, cli_shown = time_cli(weights, args.quality, args.prompt, args.repeats)
    engine_s = time_engine(weights, args.quality, args.prompt, args.repeats)

    print("server: starting…", file=sys.stderr)
    served = Served(weights, max_queue=max(args.clients))
    try:
        load(served.url, 1, 1, API_QUALITY[args.quality], args.prompt)  # warm-up: first-call allocations
        runs = []
        for c in args.clients:
            print(f"server: {args.requests} requests from {c} client(s)…", file=sys.stderr)
            runs.append(load(served.url, c, args.requests, API_QUALITY[args.quality], args.prompt))
    finally:
        served.stop()

    def pct(xs, q):
        return float(np.percentile(xs, q)) if xs else float("nan")

    from unclip_cli.modelset import load_model_set

    name = load_model_set(weights, device="cpu").name
    body = [*common.machine_lines(), common.load_note(load_start),
            f"- Model: `{weights}` ({name}); float32 on CPU; quality `{args.quality}` (API `quality: {API_QUALITY[args.quality]}`); "
            f"prompt “{args.prompt}”, `n=1` per request"]
    body += [f"- Note: {n}" for n in notes]
    body += ["", "| what | clients | images | images/s | p50 s | p95 s | 503s |", "|---|---|---|---|---|---|---|",
             f"| CLI, whole process (`{cli_shown}`) | 1 | {len(cli)} | {1 / statistics.median(cli):.3f} | "
             f"{statistics.median(cli):.2f} | {pct(cli, 95):.2f} | — |",
             f"| engine in-process (`Engine.run`, the model's own time) | 1 | {len(engine_s)} | {1 / statistics.median(engine_s):.3f} | "
             f"{statistics.median(engine_s):.2f} | {pct(engine_s, 95):.2f} | — |"]
    for r in runs:
        lat = r["latencies"]
        body.append(f"| server (`POST /v1/images/generations`) | {r['clients']} | {r['ok']} | {r['ok'] / r['wall']:.3f} | "
                    f"{pct(lat, 50):.2f} | {pct(lat, 95):.2f} | {r['busy']} |")
    body += ["", f"Server: `{served.command}`, one warm-up request first; images/s is requests answered over the batch's wall "
             "time, latencies as each client measured them (request sent to JSON received)."]
    text = "\n".join(body)
    print(text)
    if not args.no_results:
        path = common.append_results(f"serve — {name}", body)
        print(f"appended to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
