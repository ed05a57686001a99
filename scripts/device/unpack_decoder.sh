#!/usr/bin/env bash
# Here, after the training call: join the returned decoder parts, check them, make a model set of weights/emoji
# with that decoder, evaluate it and weights/emoji on the same 200 held-out prompts, and ship the decoder into
# weights/emoji only if it beats the shipped one on both the independent classifier's top-5 (mean of en and zh)
# and the Frechet distance.
# Usage: scripts/device/unpack_decoder.sh FILES WORK CORPUS    FILES: the call's files_at; WORK: a folder outside
#        the repo (e.g. ~/unclip-runs/gpu26); CORPUS: the 256 px corpus (~/.cache/unclip/emoji-256)
# Env: NO_SHIP (set: evaluate and say, change nothing in weights/), THREADS (torch threads for eval; 2),
#      EVAL_ARGS ("--max-prompts 200"; a rehearsal: "--quick --max-prompts 4", which never ships).
# The set: a 32 px decoder takes weights/emoji's whole upsampler chain (32 -> 128 -> 256); a 64 px one takes its
# 64 -> 256 stage (upsampler-2) as its only upsampler. The baseline's metrics (WORK/eval-shipped-ARGS.json) are
# made once per EVAL_ARGS and reused; each full eval takes ~16 minutes on 2 busy cores.
set -euo pipefail
files=$1 work=$2 corpus=$3
cd "$(git rev-parse --show-toplevel)"
mkdir -p "$work"
set=$work/set
rm -rf "$set" && mkdir -p "$set"
cat "$files"/decoder.safetensors.part-* > "$set/decoder.safetensors"
(cd "$set" && sha256sum -c "$files/decoder.sha256")
size=$(.venv/bin/python -c "from unclip_cli import checkpoint; print(checkpoint.load('$set/decoder.safetensors', 'decoder').config.image_size)")
cp weights/emoji/clip.safetensors weights/emoji/prior.safetensors weights/emoji/domain.json "$set"/
case $size in
  32) cp weights/emoji/upsampler*.safetensors "$set"/ ;;
  64) cp weights/emoji/upsampler-2.safetensors "$set/upsampler.safetensors" ;;
  *) echo "a $size px decoder has no upsampler chain here"; exit 1 ;;
esac
mkdir -p "$work/device-logs" && tar xzf "$files/logs.tgz" -C "$work/device-logs"
cp "$files"/monitor.txt "$files"/train.txt "$work/device-logs/" 2> /dev/null || true
.venv/bin/unclip info --weights "$set" > /dev/null  # loads and checks the chain before a long eval
export OMP_NUM_THREADS=${THREADS:-2}
eval_args=${EVAL_ARGS:---max-prompts 200}
tag=$(echo "$eval_args" | tr -c 'a-z0-9\n' '_' | tr -d '\n')
ev() { .venv/bin/unclip eval --weights "$1" --data "$corpus" $eval_args --out "$2" --quiet; }
[ -f "$work/eval-shipped$tag.json" ] || ev weights/emoji "$work/eval-shipped$tag.json"
ev "$set" "$work/eval-new$tag.json"
verdict=$(.venv/bin/python - "$work/eval-shipped$tag.json" "$work/eval-new$tag.json" <<'PY'
import json, sys
def read(path):
    m = json.load(open(path))["metrics"]
    top5 = [m["classifier"]["generated"][lang]["top5"] for lang in ("en", "zh")]
    return sum(top5) / 2, top5, m["generate"]["frechet_clip"]
(b5, b5l, bfd), (n5, n5l, nfd) = read(sys.argv[1]), read(sys.argv[2])
print(f"classifier top-5 (en/zh): shipped {b5l[0]:.2f}/{b5l[1]:.2f} mean {b5:.3f}, new {n5l[0]:.2f}/{n5l[1]:.2f} mean {n5:.3f}", file=sys.stderr)
print(f"Frechet distance: shipped {bfd:.4f}, new {nfd:.4f}", file=sys.stderr)
print("SHIP" if n5 > b5 and nfd < bfd else "KEEP")
PY
)
echo "verdict: $verdict"
if [ "$verdict" = SHIP ] && [ -z "${NO_SHIP:-}" ] && [ "$eval_args" = "--max-prompts 200" ]; then
  rm -f weights/emoji/decoder.safetensors weights/emoji/upsampler*.safetensors
  cp "$set"/decoder.safetensors "$set"/upsampler*.safetensors weights/emoji/
  cp "$work/eval-new$tag.json" weights/emoji/metrics.json
  echo "shipped: weights/emoji has the new decoder and its metrics.json; update MODEL_CARD.md and CHANGELOG.md, then commit"
else
  echo "weights/emoji unchanged; the set is in $set, its metrics in $work/eval-new$tag.json"
fi
