"""Where a whole `unclip generate -n 4` process spends its time outside sampling: wall clock per phase, in one process.

    python benchmarks/bench_startup.py default bf16     # QUALITY PRECISION; run on an idle machine

Prints the seconds of: import torch, the CLI's and the engine's imports, Engine.load, a first (cold) and a second
(warm) generate call, and writing the PNGs; the cold run's extra is what a fresh process pays beyond sampling."""
from pathlib import Path
import time, sys
from unclip_cli.cli.load import keep_freed_memory; keep_freed_memory()  # as the console script does  # noqa: E702
T = [("start", time.perf_counter())]
def mark(name): T.append((name, time.perf_counter()))
import torch; mark("import torch")  # noqa: F401,E702
import unclip_cli.cli, unclip_cli.cli.images, unclip_cli.cli.options; mark("import the CLI")  # noqa: F401,E702
from unclip_cli.engine import Engine; from unclip_cli.requests import GenerateRequest; mark("import the engine")
eng = Engine.load(Path(__file__).resolve().parents[1] / "weights" / "emoji", device="cpu"); mark("Engine.load (headers, shapes)")
q, p = sys.argv[1], sys.argv[2]
req = lambda: GenerateRequest(prompt="an emoji of a red apple", n=4, seed=0, quality=q, precision=p)
r = eng.run(req()); mark("run 1 (cold: networks read, tokenizer, first calls)")
r = eng.run(req()); mark("run 2 (warm)")
from unclip_cli.imageio import OutputSet, grid
import tempfile
with OutputSet(tempfile.mkdtemp()) as outs:
    for im, rec in zip(r.images, r.recipes):
        outs.add_png(im, "x", index=True, recipe=rec)
    outs.add_png(grid(r.images), "x-grid")
mark("write 4 PNGs + grid")
for (a, w0), (b, w1) in zip(T, T[1:]):
    print(f"{b:52s} {w1 - w0:6.2f} s")
print(f"cold - warm run: {(T[5][1]-T[4][1]) - (T[6][1]-T[5][1]):.2f} s")
