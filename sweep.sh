#!/usr/bin/env bash
# The paper's table: trains the missing source models, runs finetune.py for
# every (seed, dataset, method), then table.py. finetune.py skips a run whose
# result exists and one another worker is running, so a killed sweep resumes
# and JOBS workers (or sweeps sharing a results folder) split the work.
#   bash sweep.sh            # sources, runs, table
#   bash sweep.sh sources    # only the missing source models
#   bash sweep.sh runs       # only the runs (a Slurm array task: slurm/)
# Knobs are environment variables; each is printed with its value.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd) STEP=${1:-all}
case $STEP in all|sources|runs) ;; *) echo "usage: bash sweep.sh [sources|runs]" >&2; exit 2;; esac
SMALL=${SMALL:-0}
knob() {  # knob NAME DEFAULT [SMALL=1 DEFAULT]: the environment wins
  [ "$SMALL" = 1 ] && set -- "$1" "${3-$2}"
  printf -v "$1" %s "${!1-$2}"; echo "$1=\"${!1}\""
}
knob DATA_DIR data                      # CIFAR-10's folder (downloaded if missing)
knob CACHE data/cache                   # decoded CIFAR-10 and corrupted pools
knob RESULTS results results/small      # one JSON per run, logs/, table.md
knob CKPT paper ckpt/source_small.pt    # CIFAR source: the paper's, or a path
knob TRAIN_ARGS "" "--small --epochs 10 --holdout 1017"  # train.py flags for it
knob FAMILY_CKPT ckpt                   # <dir>/<data>.pt: ImageNet-family sources
knob IMAGENET_C_DIR data/imagenet-c     # <dir>/<corruption>/<severity>/<wnid>/
knob IN_CORRUPTIONS paper15             # ImageNet-C: paper15, all19 or names
knob IMAGENET_DIR data/imagenet         # ImageNet {train,val}/ for BREEDS
knob BREEDS_DIR data/breeds             # the BREEDS hierarchy files
knob WATERBIRDS_DIR data/waterbird_complete95_forest2water2
knob CELEBA_DIR data                    # torchvision's CelebA root
knob TINY_DIR data/tiny-imagenet-200    # Tiny-ImageNet-200, for our tiny_breeds
knob SEEDS "0 1 2" "0 1"
knob CORRUPTIONS paper14 gaussian_noise  # CIFAR-C: names, paper14, standard15, all
knob METHODS "none layer1 layer2 layer3 fc all l1 auto_snr auto_rgn"  # + layer4 on ResNet-50
knob DATASETS "cifar_c cifar_flip imagenet_c living17 entity30 waterbirds celeba tiny_breeds"
knob OBJECTIVE ce                       # ce (the table), memo or entropy
knob EXTRA "" "--train_n 100 --val_per_class 5 --test_per_class 20 --epochs 2 --l1_lambdas 1e-4"
knob DEVICE auto
knob JOBS 1 2                           # workers at once
knob OMP_NUM_THREADS $(( $(nproc) / JOBS > 1 ? $(nproc) / JOBS : 1 )) && export OMP_NUM_THREADS

dataset() {  # sets F (--data_dir), B (--breeds_dir), S (source), C (corruptions), M
  # (methods); false when the dataset's folder is not there
  S=$FAMILY_CKPT/$1.pt F="" B="" C="" M=$METHODS
  [[ $1 == cifar_* || $1 == tiny_* ]] ||  # ResNet-50: layer4 too
    M=$(for m in $METHODS; do echo $m; [ $m != layer3 ] || echo layer4; done)
  case $1 in
    cifar_c) F=$DATA_DIR S=$CKPT C=$CORRUPTIONS;;
    cifar_flip) F=$DATA_DIR S=$CKPT;;
    imagenet_c) F=$IMAGENET_C_DIR S=imagenet C=$IN_CORRUPTIONS && [ -d "$F" ];;
    living17|entity30) F=$IMAGENET_DIR B=$BREEDS_DIR && [ -d "$F/train" ];;
    waterbirds) F=$WATERBIRDS_DIR && [ -f "$F/metadata.csv" ];;
    celeba) F=$CELEBA_DIR && [ -f "$F/celeba/list_attr_celeba.txt" ];;
    tiny_breeds) F=$TINY_DIR B=$BREEDS_DIR && [ -f "$F/wnids.txt" ];;
    *) echo "error: unknown dataset '$1' in DATASETS" >&2; exit 2;;
  esac
}
for d in $DATASETS; do dataset "$d" || echo "no data: $d (README: the ImageNet family)"; done

sources() {  # train.py for each missing source model ("paper", "imagenet": downloaded)
  for d in $DATASETS; do
    dataset "$d" && [[ $S != paper && $S != imagenet && ! -f $S ]] || continue
    train=(python "$HERE/train.py" --data "${d/cifar_*/cifar10}" --out "$S" --data_dir "$F"
           --cache_dir "$CACHE" --device "$DEVICE")
    [ -z "$B" ] || train+=(--breeds_dir "$B")
    [[ $d != cifar_* ]] || train+=($TRAIN_ARGS)
    echo "no source model $S: ${train[*]}" && "${train[@]}" < /dev/null
  done
}

worker() {  # every run in order; finetune.py skips what is done or taken
  local n=$1 status=0 gpus=(${SWEEP_GPUS:-})
  [ ${#gpus[@]} = 0 ] || export CUDA_VISIBLE_DEVICES=${gpus[n % ${#gpus[@]}]}
  for s in $SEEDS; do for d in $DATASETS; do dataset "$d" || continue; for t in $M; do
    log=$RESULTS/logs/$d-$t-s$s-$OBJECTIVE.w$n.log
    run=(python "$HERE/finetune.py" --data "$d" --tune "$t" --seed "$s" --ckpt "$S"
         --objective "$OBJECTIVE" --data_dir "$F" --cache_dir "$CACHE" --out_dir "$RESULTS"
         --device "$DEVICE" $EXTRA)
    [ -z "$C" ] || run+=(--corruption "${C// /,}")
    [ -z "$B" ] || run+=(--breeds_dir "$B")
    if "${run[@]}" >> "$log" 2>&1 < /dev/null; then
      echo "$d tune=$t seed=$s: ok ($log)"
    else
      echo "$d tune=$t seed=$s: FAILED, see $log"; status=1
    fi
  done; done; done
  return $status
}

runs() {
  mkdir -p "$RESULTS/logs"
  GPUS=${CUDA_VISIBLE_DEVICES-$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null || true)}
  export SWEEP_GPUS=$([ "$DEVICE" = cpu ] || echo ${GPUS//,/ })
  local pids=() failed=0
  for n in $(seq 0 $((JOBS - 1))); do worker "$n" & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p" || failed=1; done
  return $failed
}

START=$(date +%s) failed=0
[ "$STEP" = runs ] || sources
[ "$STEP" = sources ] || runs || failed=1
if [ "$STEP" = all ]; then python "$HERE/table.py" --results "$RESULTS" || failed=1; fi
msg="sweep: $(( $(date +%s) - START ))s"
[ $failed = 0 ] || msg+=", SOME FAILED"
echo "$msg" && exit $failed
