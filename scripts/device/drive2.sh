# call 2/3: wait until END_S (or until both trainers exit), then export what exists
T0=$(date +%s); source .gpu/common.sh
[ -d $R ] || { echo "NO RUN FOLDER: the machine is fresh"; exit 3; }
while [ $(( $(date +%s) - T0 )) -lt ${END_S:-540} ]; do
  pgrep -f "unclip_cli train" > /dev/null || { echo "trainers done"; break; }
  sleep 20; status
done
tail -n 3 $R/decoder.log $R/prior.log
collect
