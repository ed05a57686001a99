#!/usr/bin/env bash
# Here, after the training call: join the returned decoder parts, check them, and export one model set from
# weights/emoji's CLIP and prior, that decoder, and the upsampler of a CPU run (its latest EMA weights).
# Usage: scripts/device/unpack64.sh FILES RUN SET    FILES: the call's files_at; RUN: the upsampler's run
#        (e.g. ~/unclip-runs/v04); SET: the new model set's folder (replaced), e.g. ~/unclip-runs/v04/set
set -euo pipefail
files=$1 run=$2 set=$3
cd "$(git rev-parse --show-toplevel)"
base=$(mktemp -d)
trap 'rm -rf "$base"' EXIT
cat "$files"/decoder.safetensors.part-* > "$base/decoder.safetensors"
(cd "$base" && sha256sum -c "$files/decoder.sha256")
cp weights/emoji/clip.safetensors weights/emoji/prior.safetensors "$base"/
[ -f "$run/upsampler/state.safetensors" ] || { echo "no upsampler state in $run"; exit 1; }
.venv/bin/unclip train export "$run" --to "$set" --base "$base" --force
mkdir -p "$run/device-logs" && tar xzf "$files/logs.tgz" -C "$run/device-logs"
cp "$files"/monitor.txt "$files"/train.txt "$run/device-logs/" 2> /dev/null || true
echo "model set in $set; device logs in $run/device-logs"
