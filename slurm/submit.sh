#!/usr/bin/env bash
# The sweep on Slurm, with sweep.sh's knobs (slurm/README.md):
#   JOBS=50 bash slurm/submit.sh          # a job for the missing source models,
#                                         # then an array of 50 workers after it
#   SBATCH_PARTITION=gpu SBATCH_GRES=gpu:1 SBATCH_TIMELIMIT=4:00:00 JOBS=50 bash slurm/submit.sh
# The workers share RESULTS (finetune.py locks each run, so none runs twice);
# when they are done: python table.py --results RESULTS.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
JOBS=${JOBS:-1}
results=${RESULTS-results}
[ "${SMALL:-0}" != 1 ] || results=${RESULTS-results/small}  # sweep.sh's default
mkdir -p "$results/logs"
src=$(sbatch --parsable --job-name=surgical-source --output="$results/logs/source-%j.out" \
  --wrap "bash $HERE/sweep.sh sources" | cut -d ';' -f 1)
sbatch --dependency="afterok:$src" --kill-on-invalid-dep=yes --array="1-$JOBS" \
  --output="$results/logs/slurm-%A_%a.out" "$HERE/slurm/array.sbatch" "$HERE"
echo "$JOBS workers submitted after the source job $src; when they are done:" \
  "python $HERE/table.py --results $results"
