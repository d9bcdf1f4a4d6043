#!/usr/bin/env bash
# The paper's table (PROTOCOL section 7): trains missing source models, runs finetune.py once per (dataset,
# corruption, method, seed) whose JSON is missing (a kill loses only runs in flight), then table.py. Modes:
# --list (pending runs: path TAB flags), --sources (train.py lines), --one LINE (one run: a worker's job).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd) MODE=${1:-run} START=$(date +%s) SMALL=${SMALL:-0}
case $MODE in run) exec 3>&1;; --list|--sources) exec 3>&2;; --one) exec 3>/dev/null;;  # 3: knobs, "no data"
  *) echo "usage: bash sweep.sh [--list | --sources | --one LINE]; Slurm: slurm/submit.sh" >&2; exit 2;; esac
knob() { [ "$SMALL" = 1 ] && set -- "$1" "${3-$2}"; printf -v "$1" %s "${!1-$2}"; echo "$1=\"${!1}\"" >&3; }
knob SMALL 0                            # 1: all at CPU scale (3rd values); a knob set, even empty, stays
knob DATA_DIR data                      # CIFAR-10's folder: cifar-10-batches-py (downloaded if missing)
knob CACHE data/cache                   # decoded CIFAR-10 and corrupted pools, made once
knob RESULTS results results/small      # one JSON per run, logs/, .locks/, table.md
knob CKPT paper ckpt/source_small.pt    # CIFAR source: the paper's, or a path (trained if missing)
knob TRAIN_ARGS "" "--small --epochs 10 --holdout 1017"  # train.py flags for it (1017: the sample's held out)
knob FAMILY_CKPT ckpt                   # <dir>/<data>.pt: the ImageNet-family sources (trained if missing)
knob IMAGENET_C_DIR data/imagenet-c     # the ImageNet-C release: <dir>/<corruption>/<severity>/
knob IN_CORRUPTIONS paper15             # ImageNet-C: paper15, all19 or names
knob IMAGENET_DIR data/imagenet         # ImageNet {train,val}/, for Living-17 and Entity-30
knob BREEDS_DIR data/breeds             # the BREEDS hierarchy files, for those two
knob WATERBIRDS_DIR data/waterbird_complete95_forest2water2  # the Waterbirds release, with metadata.csv
knob CELEBA_DIR data                    # torchvision's CelebA root: <dir>/celeba/
knob SEEDS "0 1 2" "0 1"                # one run per seed
knob CORRUPTIONS paper14 gaussian_noise # CIFAR-C: names (space or comma list), paper14, standard15, all19
knob METHODS "none layer1 layer2 layer3 fc all l1 auto_snr auto_rgn"  # --tune values (ResNet-50: + layer4)
ALL="cifar_c cifar_flip imagenet_c living17 entity30 waterbirds celeba" && knob DATASETS "$ALL"  # columns
knob OBJECTIVE ce                       # ce (the table), memo or entropy (unsupervised)
knob EXTRA "" "--train_n 100 --val_per_class 5 --test_per_class 20 --epochs 2 --l1_lambdas 1e-4"  # run flags
knob DEVICE auto                        # --device of finetune.py and train.py
knob JOBS 1 "$(nproc)"                  # runs at once
knob OMP_NUM_THREADS $(( $(nproc) / JOBS > 1 ? $(nproc) / JOBS : 1 )) && export OMP_NUM_THREADS  # a run's
dataset() {  # sets dataset $1's F (--data_dir), B (--breeds_dir), S (source model), C (corruptions) and
  M=$METHODS S=$FAMILY_CKPT/$1.pt B="" C=""  # M (--tune values, + layer4 on ResNet-50); false if no data
  [[ $1 == cifar_* ]] || M=$(for m in $METHODS; do echo "$m"; [ "$m" != layer3 ] || echo layer4; done)
  case $1 in cifar_c) F=$DATA_DIR S=$CKPT C=$CORRUPTIONS;; cifar_flip) F=$DATA_DIR S=$CKPT;;  # (downloaded)
    imagenet_c) F=$IMAGENET_C_DIR S=imagenet C=$IN_CORRUPTIONS && [ -d "$F" ];;
    living17|entity30) F=$IMAGENET_DIR B=$BREEDS_DIR && [ -d "$F/train" ] && [ -f "$B/class_hierarchy.txt" ];;
    waterbirds) F=$WATERBIRDS_DIR && [ -f "$F/metadata.csv" ];;
    celeba) F=$CELEBA_DIR && [ -f "$F/celeba/list_attr_celeba.txt" ];;
    *) echo "error: unknown dataset '$1' in DATASETS; valid: $ALL" >&2; exit 1;; esac
}
dirs() { printf -- '--data_dir %q' "$F"; [ -z "$B" ] || printf -- ' --breeds_dir %q' "$B"; }  # folder flags
COMMON=$(printf -- '--cache_dir %q --out_dir %q --device %q' "$CACHE" "$RESULTS" "$DEVICE")" $EXTRA"
runs() {  # every run "<result path>\t<flags>" from ONE python start: finetune.py names each result (settings
  # included), expands corruption presets, checks flags. Seeds outermost: a part-done sweep has whole cells.
  for s in $SEEDS; do for d in $DATASETS; do dataset "$d" || continue; for t in $M; do
    printf -- '--data %s %s--tune %s --seed %s --ckpt %q --objective %s %s %s\n' "$d" \
      "${C:+--corruption ${C// /,} }" "$t" "$s" "$S" "$OBJECTIVE" "$(dirs)" "$COMMON"
  done; done; done | python "$HERE/finetune.py" --result_paths; }
pending() { while IFS=$'\t' read -r out args; do [ -f "$out" ] || printf '%s\t%s\n' "$out" "$args"; done; }
sources() {  # a train.py line per missing source model, each once ("paper" and "imagenet" are downloaded)
  for d in $DATASETS; do dataset "$d" && [[ $S != paper && $S != imagenet && ! -f $S ]] || continue
    printf 'python %q --data %s --out %q %s --cache_dir %q --device %q %s\n' "$HERE/train.py" \
      "${d/cifar_*/cifar10}" "$S" "$(dirs)" "$CACHE" "$DEVICE" "$([[ $d != cifar_* ]] || echo "$TRAIN_ARGS")"
  done | awk '!seen[$0]++'; }
fmt() { if [ "$1" -lt 100 ]; then echo "${1}s"; else echo "$(( $1 / 60 )).$(( $1 % 60 / 6 ))m"; fi; }
one() {  # one --list line: finetune.py unless another sweep runs it or has; prints "<run> -> <acc> (<time>)"
  IFS=$'\t' read -r out args <<< "$1" && name=$(basename "$out" .json) dir=$(dirname "$out") t0=$(date +%s)
  # A lock per run, inherited by finetune.py so held till the run ends even if this shell is killed: sweeps
  # sharing a results folder never run a run twice. Once the lock is ours, the result is checked again.
  mkdir -p "$dir/.locks" "$dir/logs"; exec {lock}>> "$dir/.locks/$name"; log=$dir/logs/$name.log
  flock -n "$lock" && [ ! -f "$out" ] || return 0
  g=(${SWEEP_GPUS:-}) && [ ${#g[@]} = 0 ] || export CUDA_VISIBLE_DEVICES=${g[SLOT % ${#g[@]}]}  # GPU per slot
  eval "python \"$HERE/finetune.py\" $args" > "$log" 2>&1 < /dev/null &&  # eval: the flags are shell-quoted
    acc=$(python -c 'import json, sys; print("%.2f%%" % json.load(open(sys.argv[1]))["test_acc"])' "$out") \
    || acc="FAILED, see $log"  # (finetune.py failed, or wrote no readable result)
  IFS=- read -r d c t s more <<< "$name" && took=$(( $(date +%s) - t0 ))
  echo "$d/$c tune=$t seed=${s#s}${more:+ [$more]} -> $acc ($(fmt $took))" && [[ $acc != FAILED* ]]; }
for d in $DATASETS; do dataset "$d" || echo "no data: $d (README: The ImageNet family)" >&3; done
case $MODE in --one) one "$2"; exit;; --list) runs | pending; exit;; --sources) sources; exit;; esac
TMP=$(mktemp -d) && trap 'rm -rf "$TMP"' EXIT  # this sweep's run lists
runs > "$TMP/all"; pending < "$TMP/all" > "$TMP/todo"  # before any training: a bad knob stops here
sources | while read -r cmd; do echo "no source model: $cmd" && eval "$cmd" < /dev/null; done
GPUS=${CUDA_VISIBLE_DEVICES-$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null || true)}
export SWEEP_GPUS=$([ "$DEVICE" = cpu ] || echo ${GPUS//,/ }) && N=$(wc -l < "$TMP/todo") k=0 T0=$(date +%s)
echo "$N runs to do, $(( $(wc -l < "$TMP/all") - N )) already done in $RESULTS, $JOBS at once"
xargs -d '\n' -r -P "$JOBS" --process-slot-var=SLOT -n 1 bash "$0" --one < "$TMP/todo" | while read -r l; do
  k=$((k + 1)) && echo "[$k/$N] ${l%)}, ETA $(fmt $(( ($(date +%s) - T0) * (N - k) / k ))))"; done || failed=1
python "$HERE/table.py" --results "$RESULTS"
echo "sweep: $N runs in $(fmt $(( $(date +%s) - START )))${failed:+, SOME FAILED}" && [ -z "${failed:-}" ]
