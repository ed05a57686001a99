# sourced by the drive scripts: environment on the device machine
export PYTHONUNBUFFERED=1 R=/tmp/run D=/tmp/corpus
if [ ! -d /tmp/site/open_clip ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
collect() {  # export what exists and the logs into $OUT
  python3 -m unclip_cli train export $R --to $OUT/set --base weights/emoji --force > $OUT/export.txt 2>&1 || echo "export failed: $(tail -3 $OUT/export.txt)"
  rm -f $OUT/set/MODEL_CARD.md
  tar czf $OUT/logs.tgz -C $R --exclude='*.safetensors' --exclude=cache --exclude=embeddings --exclude='*.u8' . 2>/dev/null
  ls -la $OUT $OUT/set 2>/dev/null
}
status() {
  for s in clip prior decoder; do [ -f $R/$s/metrics.jsonl ] && echo "$s: $(tail -1 $R/$s/metrics.jsonl)"; done
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
}
