#!/usr/bin/env bash
# Here, just before the calls: does each pack folder still fit in one call beside the working tree (64 MiB)?
# Usage: scripts/device/check_pack.sh [PREFIX]    (PREFIX: .gpudec)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2> /dev/null | awk '{s += $1} END {print s}')
status=0
for folder in $(ls -d "${1:-.gpudec}"-* | sort -V); do
  size=$(du -cb "$folder" | tail -n 1 | cut -f1)
  total=$(( tree + size ))
  verdict=fits; [ $total -le $(( 64 * 1048576 )) ] || { verdict="TOO BIG: run pack_decoder.sh again"; status=1; }
  printf '%s: %.1f MiB + working tree %.1f MiB = %.1f MiB of 64: %s\n' "$folder" "$(echo "$size / 1048576" | bc -l)" \
    "$(echo "$tree / 1048576" | bc -l)" "$(echo "$total / 1048576" | bc -l)" "$verdict"
done
exit $status
