#!/usr/bin/env bash
# Here (no GPU): fill .gpu64-1/ ... .gpu64-N/ (ignored by git) for the 64 px decoder run. Each folder is what one
# device call carries beside the working tree: 1 .. N-1 are staged by short calls, N (with train64.sh, prep64.py
# and the three wheels the device image lacks) is the training call. Prints the calls to make.
# Usage: scripts/device/pack64.sh RUN CORPUS     e.g. ~/unclip-runs/v04 ~/.cache/unclip/emoji-256
# Env: PREFIX (.gpu64; another for a rehearsal), MARGIN_MIB (4), PART_MIB (instead of the computed size), REUSE_XZ
#      (set: cut the xz stream made before again, e.g. after the working tree grew),
#      NO_WHEELS (set: skip the download).
set -euo pipefail
run=$1 corpus=$2 prefix=${PREFIX:-.gpu64}
cd "$(git rev-parse --show-toplevel)"
grep -qxF "/.gpu64-*/" .git/info/exclude 2> /dev/null || { mkdir -p .git/info; echo "/.gpu64-*/" >> .git/info/exclude; }
# A call carries 64 MiB with what travels anyway (tracked and untracked-not-ignored files); keep MARGIN_MIB
# (default 4) for the scripts, the wheels and files others add before the calls.
tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2> /dev/null | awk '{s += $1} END {print s}')
part_mib=${PART_MIB:-$(python3 -c "print(round((64 * 2**20 - $tree) / 2**20 - ${MARGIN_MIB:-4}, 1))")}
echo "working tree $(( tree / 1048576 )) MiB: parts of at most $part_mib MiB"
rm -rf "$prefix"-*
.venv/bin/python scripts/device/pack64.py "$run" "$corpus" "$prefix" "$part_mib"
last=$(ls -d "$prefix"-* | sort -V | tail -n 1)
cp scripts/device/train64.sh scripts/device/prep64.py "$last"/
if [ -z "${NO_WHEELS:-}" ]; then
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d "$last" \
    open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
fi
du -sh "$prefix"-*
n=$(ls -d "$prefix"-* | wc -l)
echo "device calls, back to back (the machine goes back 30 s after a call):"
for k in $(seq 1 $(( n - 1 ))); do
  echo "  run carry=[\"$prefix-$k\"] timeout_s=120: mkdir -p /tmp/stage64 && cp $prefix-$k/part-* /tmp/stage64/ && ls -la /tmp/stage64"
done
echo "  run carry=[\"$last\"] timeout_s=600: DEC_MIN=7.5 bash $last/train64.sh"
