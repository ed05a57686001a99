# call 1: prep, CLIP for CLIP_S seconds, then prior and decoder in the background (own sessions), until END_S
T0=$(date +%s); source .gpu/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; python3 -c "import torch, open_clip; print(torch.__version__, open_clip.__version__)"
python3 .gpu/prep.py $D $R || exit 1
python3 .gpu/clip_phase.py $R $D ${CLIP_S:-300} ${CHUNK_MIN:-1} ${CLIP_BATCH:-1024} ${CLIP_LR:-1e-3} 2>&1 | grep -v '^\s*$' | tee $OUT/clip_phase.txt
[ -f $R/frozen_clip.safetensors ] || exit 1
setsid nohup python3 -m unclip_cli train decoder --data $D --run $R --batch-size ${DEC_BATCH:-512} --lr ${DEC_LR:-4e-4} --max-minutes ${DEC_MIN:-16} --checkpoint-minutes 2.5 -q > $R/decoder.log 2>&1 < /dev/null &
for i in $(seq 600); do [ -f $R/embeddings/meta.json ] && break; sleep 1; done
echo "embeddings ready after $(( $(date +%s) - T0 )) s"
setsid nohup python3 -m unclip_cli train prior --data $D --run $R --batch-size ${PRIOR_BATCH:-512} --lr ${PRIOR_LR:-3e-4} --max-minutes ${PRIOR_MIN:-15} --checkpoint-minutes 2.5 -q > $R/prior.log 2>&1 < /dev/null &
while [ $(( $(date +%s) - T0 )) -lt ${END_S:-540} ]; do sleep 20; status; done
tail -n 3 $R/decoder.log $R/prior.log
collect
