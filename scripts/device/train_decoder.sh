# Device side, the training call: a decoder against weights/emoji's CLIP, its data on the GPU, for DEC_MIN minutes;
# returns the exported decoder in parts under 16 MiB, logs and a GPU monitor in $OUT.
# Run from the repo root as `bash .gpudec-N/train_decoder.sh` (N: the last pack folder), after the staging calls.
# Env: DEC_PRESET (emoji256; its decoder's size must be the packed one), DEC_INIT (unset: new weights, --clip-from
#      weights/emoji; a model set, e.g. weights/emoji: continue its decoder, --init-from), DEC_MIN (7.5),
#      DEC_BATCH (512), DEC_LR (4e-4), DEC_STEPS (unset: time-bound), PY (python3),
#      STAGE (/tmp/stagedec), R (/tmp/rundec), D (/tmp/corpusdec).
T0=$(date +%s)
HERE=$(cd "$(dirname "$0")" && pwd)
export PYTHONUNBUFFERED=1
PY=${PY:-python3} STAGE=${STAGE:-/tmp/stagedec} R=${R:-/tmp/rundec} D=${D:-/tmp/corpusdec}
OUT=${OUT:-/tmp/outdec}; mkdir -p "$OUT" "$STAGE"
cp "$HERE"/part-* "$HERE"/parts.json "$HERE"/records.json.xz "$STAGE"/
if ls "$HERE"/*.whl > /dev/null 2>&1 && ! "$PY" -c "import open_clip" 2> /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site64 "$HERE"/*.whl || exit 1
  export PYTHONPATH=/tmp/site64
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
"$PY" "$HERE/prep_decoder.py" "$STAGE" "$D" "$R" || exit 3
echo "prepared after $(( $(date +%s) - T0 )) s"

from="--clip-from weights/emoji"; [ -n "${DEC_INIT:-}" ] && from="--init-from $DEC_INIT"
echo "decoder: --preset ${DEC_PRESET:-emoji256} $from"
"$PY" -m unclip_cli train decoder --preset "${DEC_PRESET:-emoji256}" --data "$D" --run "$R" $from --data-on-device \
  --batch-size "${DEC_BATCH:-512}" --lr "${DEC_LR:-4e-4}" --max-minutes "${DEC_MIN:-7.5}" ${DEC_STEPS:+--max-steps $DEC_STEPS} \
  --checkpoint-minutes 3 -q > "$OUT/train.txt" 2>&1 &
trainer=$!
while kill -0 $trainer 2> /dev/null; do  # every 20 s: the last logged step and how busy the GPU is
  sleep 20
  line="$(( $(date +%s) - T0 )) s: $(tail -n 1 "$R/decoder/metrics.jsonl" 2> /dev/null)"
  command -v nvidia-smi > /dev/null && line="$line | gpu $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader)"
  echo "$line" | tee -a "$OUT/monitor.txt"
done
wait $trainer; status=$?
tail -n 5 "$OUT/train.txt"
[ $status -eq 0 ] || echo "TRAINER EXITED WITH $status"

# Return the decoder only: the other stages are weights/emoji's.
"$PY" -m unclip_cli train export "$R" --to /tmp/setdec --base weights/emoji --force > "$OUT/export.txt" 2>&1 || { cat "$OUT/export.txt"; exit 4; }
split -b 15M -d /tmp/setdec/decoder.safetensors "$OUT/decoder.safetensors.part-"
(cd /tmp/setdec && sha256sum decoder.safetensors) > "$OUT/decoder.sha256"
tar czf "$OUT/logs.tgz" -C "$R" --exclude='*.safetensors' --exclude=cache --exclude=embeddings decoder 2> /dev/null
ls -la "$OUT"
echo "done after $(( $(date +%s) - T0 )) s"
