#!/usr/bin/env bash
# The paper's table (PROTOCOL section 7): train the source model if $CKPT is missing, run finetune.py once per
# (dataset, corruption, method, seed) whose result JSON is missing, then table.py -> $RESULTS/table.md.
#   bash sweep.sh                  # CIFAR: 2 datasets x (14 corruptions | clean) x 9 methods x 3 seeds = 405 runs;
#                                  # each ImageNet-family column too when its folder is there ("no data: X" if not)
#   JOBS=8 bash sweep.sh           # 8 runs at once; worker slot i runs on visible GPU i mod (number of GPUs)
#   SMALL=1 DATA_DIR=../shared/data/cifar10-sample bash sweep.sh   # all of it at CPU scale: 11 min, 2 busy cores
#   bash sweep.sh --list           # the pending runs, one a line: result path <TAB> finetune.py flags
#   JOBS=50 bash sweep.sh --slurm  # the same as a Slurm job array (slurm/array.sbatch); then python table.py
# Knobs: environment variables (below). Resumable: a run whose JSON exists is skipped; finetune.py writes it to a
# temp file and renames it, so a kill at any moment (SIGKILL too) loses only the runs in flight.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
one() {  # one run-list line: skip if its result exists or another sweep runs it, else finetune.py, one progress line
  IFS=$'\t' read -r out args <<< "$1" && [ ! -f "$out" ] || return 0
  # a lock per run, held by finetune.py too: sweeps that share a results folder (or a killed sweep's runs still
  # in flight) never run the same run twice; taken, then the result checked again
  mkdir -p "$(dirname "$out")/.locks" && exec {lock}>>"$(dirname "$out")/.locks/$(basename "$out" .json)"
  flock -n "$lock" && [ ! -f "$out" ] || return 0
  read -ra gpus <<< "${GPUS:-}"  # a local worker slot keeps its GPU; Slurm sets CUDA_VISIBLE_DEVICES itself
  [ ${#gpus[@]} -gt 0 ] && [ -n "${SLOT:-}" ] && export CUDA_VISIBLE_DEVICES=${gpus[SLOT % ${#gpus[@]}]}
  log=$(dirname "$out")/logs/$(basename "$out" .json).log && t0=$(date +%s) && mkdir -p "$(dirname "$log")"
  if eval "python \"$HERE/finetune.py\" $args" > "$log" 2>&1 < /dev/null; then
    acc=$(python -c 'import json, sys; print("%.2f%%" % json.load(open(sys.argv[1]))["test_acc"])' "$out")
  else acc="FAILED, see $log"; fi
  k="task ${SLURM_ARRAY_TASK_ID:-?}" && now=$(date +%s)  # in a Slurm array the task; here the finished-run count
  [ -z "${COUNT:-}" ] || k=$(flock "$COUNT" sh -c 'echo >> "$0"; wc -l < "$0"' "$COUNT")
  IFS=- read -r d c t s more <<< "$(basename "$out" .json)" && eta=${T0:+, ETA $(fmt $(( (now - T0) * (N - k) / k )))}
  echo "[$k/${N:-${SLURM_ARRAY_TASK_COUNT:-?}}] $d/$c tune=$t seed=${s#s}${more:+ [$more]} -> $acc" \
    "($(fmt $((now - t0)))${eta:-})"
  [[ $acc != FAILED* ]]
}
fmt() { if [ "$1" -lt 100 ]; then echo "${1}s"; else echo "$(( $1 / 60 )).$(( $1 % 60 / 6 ))m"; fi; }
[ "${1:-}" = --one ] && { one "$2"; exit; }  # a Slurm array task (slurm/array.sbatch)
small() { if [ "${SMALL:-0}" = 1 ]; then echo "$1"; else echo "$2"; fi; }  # the SMALL=1 default, else the full one
DATA_DIR=${DATA_DIR:-data}                                     # holds cifar-10-batches-py (downloaded if missing)
CACHE=${CACHE:-data/cache}                                     # decoded CIFAR-10, corrupted pools: made once
RESULTS=${RESULTS:-$(small results/small results)}             # one JSON per run, logs/, table.md
CKPT=${CKPT:-$(small ckpt/source_small.pt paper)}           # CIFAR source: the paper's, or a path (trained if missing)
FAMILY_CKPT=${FAMILY_CKPT:-ckpt}                               # <dir>/<data>.pt: ImageNet-family source models
IMAGENET_C_DIR=${IMAGENET_C_DIR:-data/imagenet-c} IMAGENET_DIR=${IMAGENET_DIR:-data/imagenet}  # the family's folders
BREEDS_DIR=${BREEDS_DIR:-data/breeds} WATERBIRDS_DIR=${WATERBIRDS_DIR:-data/waterbird_complete95_forest2water2}
CELEBA_DIR=${CELEBA_DIR:-data} IN_CORRUPTIONS=${IN_CORRUPTIONS:-paper15}  # ImageNet-C: paper15, all19 or names
TRAIN_ARGS=${TRAIN_ARGS-$(small "--small --epochs 10 --holdout 1017" "")}  # train.py flags (sample: 1017)
SEEDS=${SEEDS:-$(small "0 1" "0 1 2")}
CORRUPTIONS=${CORRUPTIONS:-$(small gaussian_noise paper14)}    # names (space or comma list), paper14, standard15, all19
METHODS=${METHODS:-none layer1 layer2 layer3 fc all l1 auto_snr auto_rgn}
DATASETS=${DATASETS:-cifar_c cifar_flip imagenet_c living17 entity30 waterbirds celeba}
OBJECTIVE=${OBJECTIVE:-ce}                                     # ce (the table), memo or entropy (unsupervised)
EXTRA=${EXTRA-$(small "--train_n 100 --val_per_class 5 --test_per_class 20 --epochs 2 --l1_lambdas 1e-4" "")}  # flags
DEVICE=${DEVICE:-auto}
JOBS=${JOBS:-$(small "$(nproc)" 1)}                            # runs at once (--slurm: array tasks at once)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / JOBS > 1 ? $(nproc) / JOBS : 1 ))}  # CPU threads a run
MODE=${1:-run} && exec 3>&1 && { [ "$MODE" != --list ] || exec 3>&2; }  # news to stderr when stdout is the list
for v in SMALL DATA_DIR CACHE RESULTS CKPT TRAIN_ARGS SEEDS CORRUPTIONS METHODS DATASETS OBJECTIVE EXTRA DEVICE JOBS \
  OMP_NUM_THREADS FAMILY_CKPT IMAGENET_C_DIR IMAGENET_DIR BREEDS_DIR WATERBIRDS_DIR CELEBA_DIR IN_CORRUPTIONS; do
  echo "$v=\"${!v:-}\""; done >&3
for d in $DATASETS; do case $d in cifar_c|cifar_flip|imagenet_c|living17|entity30|waterbirds|celeba) ;; *)
  echo "error: unknown dataset '$d' in DATASETS; valid: cifar_c cifar_flip imagenet_c living17 entity30" \
    "waterbirds celeba" >&2; exit 1;; esac; done  # METHODS are checked by finetune.py when the list is made
FOLDERS=$(printf -- '--imagenet_dir %q --breeds_dir %q --waterbirds_dir %q --celeba_dir %q ' "$IMAGENET_DIR" \
  "$BREEDS_DIR" "$WATERBIRDS_DIR" "$CELEBA_DIR")  # train.py's and finetune.py's flags for the family's folders
COMMON=$(printf -- '--data_dir %q --cache_dir %q --out_dir %q --device %q --imagenet_c_dir %q ' "$DATA_DIR" "$CACHE" \
  "$RESULTS" "$DEVICE" "$IMAGENET_C_DIR")$FOLDERS$EXTRA
have() { case $1 in cifar_*) ;; imagenet_c) [ -d "$IMAGENET_C_DIR" ];; waterbirds) [ -f "$WATERBIRDS_DIR/metadata.csv" ];;
  living17|entity30) [ -d "$IMAGENET_DIR/train" ] && [ -f "$BREEDS_DIR/class_hierarchy.txt" ];;
  celeba) [ -f "$CELEBA_DIR/celeba/list_attr_celeba.txt" ];; *) false;; esac; }  # is a dataset's folder there?
ckpt() { case $1 in cifar_*) echo "$CKPT";; imagenet_c) echo imagenet;; *) echo "$FAMILY_CKPT/$1.pt";; esac; }
runs() {  # the whole run list "<result path>\t<flags>": seeds outermost, then datasets, methods, corruptions, so a
  # part-done sweep has whole cells; finetune.py expands the corruption presets, checks every flag and names each
  # result (its settings included), running nothing
  for s in $SEEDS; do for d in $DATASETS; do
    have "$d" || { [ "$s" != "${SEEDS%% *}" ] || echo "no data: $d (README: The ImageNet family)" >&3; continue; }
    case $d in cifar_c) cs=$CORRUPTIONS;; imagenet_c) cs=$IN_CORRUPTIONS;; *) cs="";; esac
    ms=$METHODS && [[ $d == cifar_* ]] || ms=${METHODS/layer3/layer3 layer4}  # ResNet-50 has a fourth block
    for t in $ms; do
      printf -- '--data %s %s--tune %s --seed %s --ckpt %q --objective %s %s\n' "$d" \
        "${cs:+--corruption ${cs// /,} }" "$t" "$s" "$(ckpt "$d")" "$OBJECTIVE" "$COMMON"
    done; done; done | python "$HERE/finetune.py" --result_paths
}
pending() { while IFS=$'\t' read -r out args; do [ -f "$out" ] || printf '%s\t%s\n' "$out" "$args"; done; }
mkdir -p "$RESULTS/logs"
[ "$MODE" != --list ] || { runs | pending; exit; }
sources() {  # one train.py command line per missing source model the run list needs (CIFAR's with $TRAIN_ARGS)
  for d in $DATASETS; do case $d in imagenet_c) continue;; cifar_*) [ "$d" = cifar_c ] || [[ " $DATASETS " != \
    *" cifar_c "* ]] || continue;; esac; have "$d" && [ "$(ckpt "$d")" != paper ] && [ ! -f "$(ckpt "$d")" ] || continue
    printf 'python %q --data %s --cache_dir %q --device %q --out %q %s%s\n' "$HERE/train.py" \
      "$(case $d in cifar_*) echo cifar10;; *) echo "$d";; esac)" "$CACHE" "$DEVICE" "$(ckpt "$d")" \
      "$(case $d in cifar_*) printf -- '--data_dir %q %s' "$DATA_DIR" "$TRAIN_ARGS";; *) echo "$FOLDERS";; esac)"
  done
}
if [ "$MODE" = --slurm ]; then  # task i runs PER_TASK lines of the list; missing source models are jobs first
  list=$RESULTS/slurm-runs-$(date +%Y%m%d-%H%M%S).txt && runs | pending > "$list"
  n=$(wc -l < "$list") && per=${PER_TASK:-1}
  ids=() && while read -r cmd; do ids+=("$(sbatch --parsable --job-name=surgical-source \
    --output="$RESULTS/logs/source-%j.out" --wrap "$cmd")"); done < <(sources)
  dep=() && [ ${#ids[@]} = 0 ] || dep=(--dependency=afterok:$(IFS=:; echo "${ids[*]}"))
  [ "$n" = 0 ] || sbatch ${dep[@]+"${dep[@]}"} --array=1-$(( (n + per - 1) / per ))%"$JOBS" \
    --output="$RESULTS/logs/slurm-%A_%a.out" "$HERE/slurm/array.sbatch" "$HERE" "$list" "$per"
  echo "$n runs submitted; when they are done: python $HERE/table.py --results $RESULTS"; exit 0
fi
TMP=$RESULTS/.sweep-$$ && mkdir -p "$TMP"  # this sweep's lists; those of killed sweeps go below
for d in "$RESULTS"/.sweep-*; do kill -0 "${d##*-}" 2>/dev/null || rm -rf "$d"; done
START=$(date +%s) && while read -r cmd; do echo "no source model: $cmd" && eval "$cmd" < /dev/null; done < <(sources)
list=$TMP/list && COUNT=$TMP/count && : > "$COUNT" && trap 'rm -rf "$TMP"' EXIT && runs > "$TMP/all"
pending < "$TMP/all" > "$list" && N=$(wc -l < "$list")
echo "$N runs to do, $(( $(wc -l < "$TMP/all") - N )) already done in $RESULTS, $JOBS at once"
GPUS=${CUDA_VISIBLE_DEVICES-$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null || true)}  # visible
[ "$DEVICE" != cpu ] || GPUS="" && export -f one fmt && export HERE COUNT N T0=$(date +%s) GPUS=$(echo ${GPUS//,/ })
status=0 && xargs -d '\n' -r -P "$JOBS" --process-slot-var=SLOT -n 1 bash -c 'one "$1"' _ < "$list" || status=1
python "$HERE/table.py" --results "$RESULTS"
echo "sweep: $N runs in $(fmt $(( $(date +%s) - START ))) with the source model$( ((status)) && echo ', SOME FAILED')"
exit $status
