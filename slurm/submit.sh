#!/usr/bin/env bash
# The sweep as a Slurm job array, with sweep.sh's knobs (slurm/README.md):
#   JOBS=50 bash slurm/submit.sh           # an array task per PER_TASK pending runs, at most JOBS at once
#   SBATCH_PARTITION=gpu SBATCH_GRES=gpu:1 SBATCH_TIMELIMIT=1:00:00 JOBS=50 PER_TASK=4 bash slurm/submit.sh
# The pending runs come from `sweep.sh --list`, saved as $RESULTS/slurm-runs-<date>.txt; array task i runs its
# slice through `sweep.sh --one` (slurm/array.sbatch). Each missing source model (`sweep.sh --sources`) is
# trained by a job of its own first; the array waits for those jobs and is cancelled if one fails.
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
PER_TASK=${PER_TASK:-1}  # runs per array task: Slurm caps an array at MaxArraySize tasks (1001 by default)
[ "${SMALL:-0}" != 1 ] || JOBS=${JOBS:-$(nproc)}  # sweep.sh's defaults
JOBS=${JOBS:-1}          # array tasks at once

runs=$(bash "$HERE/sweep.sh" --list)  # also prints the knobs (stderr) and stops here on a bad one
[ -n "$runs" ] || { echo "nothing to submit: every run has its result"; exit 0; }
# the results folder as sweep.sh resolved $RESULTS: where each listed result goes
n=$(wc -l <<< "$runs") results=$(dirname "$(head -n 1 <<< "$runs" | cut -f 1)")
list=$results/slurm-runs-$(date +%Y%m%d-%H%M%S).txt
mkdir -p "$results/logs" && printf '%s\n' "$runs" > "$list"

ids=()  # the source-model jobs (--sources repeats the knobs and "no data" on stderr: shown above already)
while read -r cmd; do  # --parsable answers "<job id>[;<cluster>]"
  [ -z "$cmd" ] || ids+=("$(sbatch --parsable --job-name=surgical-source \
    --output="$results/logs/source-%j.out" --wrap "$cmd" | cut -d ';' -f 1)")
done <<< "$(bash "$HERE/sweep.sh" --sources 2> /dev/null)"
dep=()  # none when no source is missing; else wait for all of them, and give up if one fails
[ ${#ids[@]} = 0 ] || dep=(--dependency="afterok:$(IFS=:; echo "${ids[*]}")" --kill-on-invalid-dep=yes)

sbatch ${dep[@]+"${dep[@]}"} --array="1-$(( (n + PER_TASK - 1) / PER_TASK ))%$JOBS" \
  --output="$results/logs/slurm-%A_%a.out" "$HERE/slurm/array.sbatch" "$HERE" "$list" "$PER_TASK"
echo "$n runs submitted, after ${#ids[@]} source-model job(s); when they are done:" \
  "python $HERE/table.py --results $results"
