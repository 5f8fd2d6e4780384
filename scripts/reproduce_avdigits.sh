#!/usr/bin/env bash
# The full comparison on AV-Digits, then the report:
#   5 methods (none, OGM, OGM_GE, OPM, OGM_OPM; concat fusion) x 3 seeds
#   + the two unimodal references (audio alone, visual alone) x 3 seeds       = 21 training runs
#   + a linear probe of every run, test-split inference (clean, and each modality zeroed)
#   + checkpoints/avdigits_repro/report/ {report.md, summary.json, *.png}
#
#   bash scripts/reproduce_avdigits.sh
#
# Time: a 15-epoch AV-Digits run takes about 3-4 minutes on the 2-core CPU when the machine
# is otherwise idle, so 21 runs at 15 epochs would need over an hour. Every run here trains
# the dataset's default 6 epochs (its cosine schedule over those 6; set EPOCHS to change it),
# plus the probes and inference. Each run prints its time, so the total can be judged early.
#
# Resumable: a run whose test_metrics.json exists is skipped; a run with last.pt but no
# test_metrics.json (interrupted) is continued with --resume; a run interrupted in its first
# epoch (its folder holds files but no last.pt) is started again; existing probe.json and
# eval_* outputs are kept. Rerun the same command after an interruption.
#
# Environment (all optional):
#   OUT=checkpoints/avdigits_repro   runs go to $OUT/<run>/, the report to $OUT/report/
#   EPOCHS=<dataset default, 6>  SEEDS="0 1 2"  METHODS="none OGM OGM_GE OPM OGM_OPM"  MODALITIES="audio visual"
#   LIMIT=64          --limit_samples for training and probes (smoke tests only)
#   EXTRA="..."       more train.py options for every run, e.g. EXTRA="--batch_size 16"
#   DEVICE=auto       device for training, probes and inference
# A smoke test of the whole pipeline in a few minutes:
#   OUT=/tmp/repro_smoke EPOCHS=1 SEEDS=0 LIMIT=64 EXTRA="--batch_size 16" bash scripts/reproduce_avdigits.sh
set -euo pipefail
source "$(dirname "$0")/_env.sh"

OUT=${OUT:-checkpoints/avdigits_repro}
EPOCHS=${EPOCHS:-}
SEEDS=${SEEDS:-"0 1 2"}
METHODS=${METHODS:-"none OGM OGM_GE OPM OGM_OPM"}
MODALITIES=${MODALITIES:-"audio visual"}
LIMIT=${LIMIT:-}
EXTRA=${EXTRA:-}
DEVICE=${DEVICE:-auto}
limit_args=()
[ -n "$LIMIT" ] && limit_args=(--limit_samples "$LIMIT")
epoch_args=()
[ -n "$EPOCHS" ] && epoch_args=(--epochs "$EPOCHS")
read -r -a extra_args <<< "$EXTRA"

started=$SECONDS
runs=()
train_run() {  # train_run <run name> <train.py options...>
  local name=$1 dir="$OUT/$1"
  shift
  runs+=("$dir")
  if [ -f "$dir/test_metrics.json" ]; then
    echo "== $name: done already (test_metrics.json), skipped"
    return
  fi
  local t0=$SECONDS
  if [ -f "$dir/last.pt" ]; then
    echo "== $name: continuing an interrupted run"
    "$PYTHON" code/train.py --resume "$dir/last.pt" --device "$DEVICE"
  else
    # Interrupted before its first epoch ended: nothing to resume, so start it again.
    local again=()
    [ -f "$dir/config.json" ] && again=(--overwrite) && echo "== $name: interrupted in its first epoch, starting again"
    echo "== $name: training ${EPOCHS:-the default number of} epochs"
    "$PYTHON" code/train.py --dataset avdigits --output_dir "$OUT" --run_name "$name" "${epoch_args[@]}" \
      --device "$DEVICE" "${limit_args[@]}" "${extra_args[@]}" "${again[@]}" "$@"
  fi
  echo "== $name: $((SECONDS - t0)) s (total so far $(((SECONDS - started) / 60)) min)"
}

for seed in $SEEDS; do
  for method in $METHODS; do
    train_run "${method}_seed${seed}" --modulation "$method" --seed "$seed"
  done
  for modality in $MODALITIES; do
    train_run "${modality}-alone_seed${seed}" --modality "$modality" --seed "$seed"
  done
done

echo "== linear probes"
"$PYTHON" code/probe.py --checkpoint "${runs[@]}" --skip_existing --device "$DEVICE" "${limit_args[@]}"

echo "== inference (clean and one modality zeroed) and report"
"$PYTHON" code/report.py "${runs[@]}" --out "$OUT/report" --evaluate --device "$DEVICE"
echo "== finished in $(((SECONDS - started) / 60)) min: $OUT/report/report.md"
