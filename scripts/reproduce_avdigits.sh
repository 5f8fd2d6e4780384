#!/usr/bin/env bash
# The full comparison on AV-Digits, then the report:
#   5 methods (none, OGM, OGM_GE, OPM, OGM_OPM; concat fusion) x 3 seeds
#   + the two unimodal references (audio alone, visual alone) x 3 seeds       = 21 training runs
#   + a linear probe of every run, test-split inference (clean, and each modality zeroed)
#   + checkpoints/avdigits_repro/report/ {report.md, summary.json, *.png}
#
#   bash scripts/reproduce_avdigits.sh
#
# Epochs: one 15-epoch AV-Digits run (the dataset default) takes about 3-4 minutes on the
# 2-core CPU when the machine is otherwise idle, so 21 runs at 15 epochs would need over an
# hour. The comparison therefore trains EPOCHS=8 epochs by default (cosine schedule over those
# 8 epochs): about 35-40 minutes of training plus about 10 minutes of probes and inference,
# under an hour in total. Set EPOCHS=15 for the dataset default when time allows.
#
# Resumable: a run whose test_metrics.json exists is skipped; a run with last.pt but no
# test_metrics.json (interrupted) is continued with --resume; existing probe.json and eval_*
# outputs are kept. Rerun the same command after an interruption.
#
# Environment (all optional):
#   OUT=checkpoints/avdigits_repro   runs go to $OUT/<run>/, the report to $OUT/report/
#   EPOCHS=8  SEEDS="0 1 2"  METHODS="none OGM OGM_GE OPM OGM_OPM"  MODALITIES="audio visual"
#   LIMIT=64          --limit_samples for training and probes (smoke tests only)
#   EXTRA="..."       more train.py options for every run, e.g. EXTRA="--batch_size 16"
#   DEVICE=auto       device for training, probes and inference
# A smoke test of the whole pipeline in a few minutes:
#   OUT=/tmp/repro_smoke EPOCHS=1 SEEDS=0 LIMIT=64 EXTRA="--batch_size 16" bash scripts/reproduce_avdigits.sh
set -euo pipefail
source "$(dirname "$0")/_env.sh"

OUT=${OUT:-checkpoints/avdigits_repro}
EPOCHS=${EPOCHS:-8}
SEEDS=${SEEDS:-"0 1 2"}
METHODS=${METHODS:-"none OGM OGM_GE OPM OGM_OPM"}
MODALITIES=${MODALITIES:-"audio visual"}
LIMIT=${LIMIT:-}
EXTRA=${EXTRA:-}
DEVICE=${DEVICE:-auto}
limit_args=()
[ -n "$LIMIT" ] && limit_args=(--limit_samples "$LIMIT")
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
    echo "== $name: training $EPOCHS epochs"
    "$PYTHON" code/train.py --dataset avdigits --output_dir "$OUT" --run_name "$name" --epochs "$EPOCHS" \
      --device "$DEVICE" "${limit_args[@]}" "${extra_args[@]}" "$@"
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
