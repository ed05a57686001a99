#!/usr/bin/env bash
# Here (no GPU): fill .gpu/ (ignored by git) with what the device machine needs: the 32 px image cache of a
# run (xz, ~18 MB; the repo with weights/ is ~43 MB and a call carries at most 64 MiB), the held-out check
# data, these scripts and the three wheels its image lacks.
# Usage: scripts/device/pack.sh RUN CORPUS     e.g. ~/unclip-runs/emoji ~/.cache/unclip/emoji
set -euo pipefail
run=$1 corpus=$2
cd "$(git rev-parse --show-toplevel)"
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/.gpu/" >> .git/info/exclude; }
mkdir -p .gpu
cp scripts/device/*.py scripts/device/*.sh .gpu/
xz -9 -T2 -c "$run/cache/cache-32/images-32.u8" > .gpu/images-32.u8.xz
xz -9 -c "$run/cache/cache-32/records.json" > .gpu/records.json.xz
.venv/bin/python scripts/device/make_val.py "$corpus" .gpu && xz -9 -f .gpu/concepts.json
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .gpu \
  open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
du -sh .gpu
