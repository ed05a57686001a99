"""Here: pack a run's training cache at SIZE px for the device machine, in parts that each fit in one call.

A call carries at most 64 MiB with the working tree (~51 MB), and the 20,117 training images are ~41 MiB at
64 px and ~14 MiB at 32 px even after xz -9, so they travel in parts: the images sorted by (style, key), where
neighbours look alike and compress ~7% better, as one xz stream cut into pieces of at most PART_MIB; the
records (captions, keys) with the sort order beside them. Staging calls carry the first parts; the training
call the last.

Usage: python pack_decoder.py RUN CORPUS OUT_PREFIX PART_MIB [SIZE]    (SIZE: 64)
Writes OUT_PREFIX-1/, OUT_PREFIX-2/, ... (one folder per call, the last for the training call) and prints
their sizes. RUN/cache/cache-SIZE is built from CORPUS's train shards first (the trainer's own cache).
"""
import hashlib
import json
import lzma
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from unclip_cli.train.stages import open_cache

run, corpus, prefix, part_mib = Path(sys.argv[1]).expanduser(), sys.argv[2], sys.argv[3], float(sys.argv[4])
size_px = int(sys.argv[5]) if len(sys.argv) > 5 else 64
cache = open_cache(corpus, size_px, run / "cache")
records = cache.records
order = sorted(range(len(records)), key=lambda i: (records[i].get("style") or "", records[i]["key"]))
header = json.loads((run / "cache" / f"cache-{size_px}" / "records.json").read_text())
header["order"] = order  # stream position k holds cache row order[k]

work = run / "pack"
work.mkdir(exist_ok=True)
stream = work / f"images-{size_px}.sorted.u8.xz"
# xz -9 on one thread: the 64 MB dictionary reaches across a whole style; ~4 min per 100 MB on this machine.
# REUSE_XZ=1 keeps a stream made before (same cache), to cut it again when the working tree has grown.
if os.environ.get("REUSE_XZ") and stream.is_file():
    print(f"reusing {stream}")
else:
    with open(stream, "wb") as f:
        xz = subprocess.Popen(["xz", "-9", "-T1", "-c"], stdin=subprocess.PIPE, stdout=f)
        for s in range(0, len(order), 1024):
            xz.stdin.write(np.ascontiguousarray(cache.images[np.array(order[s : s + 1024])]).tobytes())
        xz.stdin.close()
        if xz.wait() != 0:
            sys.exit("xz failed")
data = stream.read_bytes()
size = int(part_mib * 2**20)
parts = math.ceil(len(data) / size)
size = math.ceil(len(data) / parts)  # equal parts, each under the limit
sums = {}
for k in range(parts):
    folder = Path(f"{prefix}-{k + 1}")
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("part-*"):
        old.unlink()
    name = f"part-{k + 1:02d}-of-{parts:02d}"
    chunk = data[k * size : (k + 1) * size]
    (folder / name).write_bytes(chunk)
    sums[name] = hashlib.sha256(chunk).hexdigest()
last = Path(f"{prefix}-{parts}")
(last / "records.json.xz").write_bytes(lzma.compress(json.dumps(header, ensure_ascii=False).encode(), preset=9))
(last / "parts.json").write_text(json.dumps({"images": len(order), "size": size_px, "xz_bytes": len(data), "sha256": sums}, indent=1))
for k in range(parts):
    folder = Path(f"{prefix}-{k + 1}")
    print(f"{folder}: {sum(p.stat().st_size for p in folder.iterdir()) / 2**20:.1f} MiB")
print(f"{len(order)} images, {len(data) / 2**20:.1f} MiB of xz in {parts} parts")
