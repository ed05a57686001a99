#!/usr/bin/env bash
# Here (no GPU): fill PREFIX-1/ ... PREFIX-N/ (ignored by git) for a decoder run on the device machine, with the
# run's training cache at SIZE px (32: the emoji preset's decoder; 64: emoji256's). Each folder is what one device
# call carries beside the working tree: 1 .. N-1 are staged by short calls, N (with train_decoder.sh,
# prep_decoder.py and the three wheels the device image lacks) is the training call. Prints the calls to make.
# Usage: scripts/device/pack_decoder.sh SIZE RUN CORPUS     e.g. 32 ~/unclip-runs/v032 ~/.cache/unclip/emoji-256
# Env: PREFIX (.gpudec; another for a rehearsal), MARGIN_MIB (4), PART_MIB (instead of the computed size), REUSE_XZ
#      (set: cut the xz stream made before again, e.g. after the working tree grew), NO_WHEELS (set: skip the download).
set -euo pipefail
size=$1 run=$2 corpus=$3 prefix=${PREFIX:-.gpudec}
cd "$(git rev-parse --show-toplevel)"
grep -qxF "/.gpudec-*/" .git/info/exclude 2> /dev/null || { mkdir -p .git/info; echo "/.gpudec-*/" >> .git/info/exclude; }
# A call carries 64 MiB with what travels anyway (tracked and untracked-not-ignored files); keep MARGIN_MIB
# (default 4) for the scripts, the wheels and files others add before the calls.
tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2> /dev/null | awk '{s += $1} END {print s}')
part_mib=${PART_MIB:-$(python3 -c "print(round((64 * 2**20 - $tree) / 2**20 - ${MARGIN_MIB:-4}, 1))")}
echo "working tree $(( tree / 1048576 )) MiB: parts of at most $part_mib MiB"
rm -rf "$prefix"-*
.venv/bin/python scripts/device/pack_decoder.py "$run" "$corpus" "$prefix" "$part_mib" "$size"
last=$(ls -d "$prefix"-* | sort -V | tail -n 1)
cp scripts/device/train_decoder.sh scripts/device/prep_decoder.py "$last"/
if [ -z "${NO_WHEELS:-}" ]; then
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d "$last" \
    open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
fi
du -sh "$prefix"-*
n=$(ls -d "$prefix"-* | wc -l)
echo "device calls, back to back (the machine goes back 30 s after a call):"
for k in $(seq 1 $(( n - 1 ))); do
  echo "  run carry=[\"$prefix-$k\"] timeout_s=120: mkdir -p /tmp/stagedec && cp $prefix-$k/part-* /tmp/stagedec/ && ls -la /tmp/stagedec"
done
echo "  run carry=[\"$last\"] timeout_s=600: DEC_PRESET=... DEC_INIT=... DEC_MIN=7.5 bash $last/train_decoder.sh   (scripts/device/README.md)"
