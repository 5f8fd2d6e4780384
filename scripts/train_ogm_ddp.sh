#!/usr/bin/env bash
# OGM-GE training with DistributedDataParallel (torchrun), from any working directory.
#
#   scripts/train_ogm_ddp.sh [train.py options ...]      # e.g. --dataset cremad --data data/cremad_cache
#
# Every option is passed on to code/train.py and wins over the defaults below. --batch_size is
# per process: the global batch is NPROC x NNODES x --batch_size. The script runs from the
# repository root, so relative paths (--data, --output_dir, --resume) are taken from there.
#
# Environment:
#   NPROC        processes on this node (default: its number of GPUs, or 2 without one)
#   NNODES       nodes taking part (default 1); with more, also set on every node:
#   NODE_RANK    this node's index, 0 .. NNODES-1
#   MASTER_ADDR  address of node 0, reachable from every node
#   MASTER_PORT  a free TCP port on node 0 (default 29500)
#   PYTHON       the interpreter (default: the repository's .venv, else python3)
# See docs/distributed.md.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
NPROC="${NPROC:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')}"
NNODES="${NNODES:-1}"

if [[ "$NNODES" -gt 1 ]]; then
    : "${NODE_RANK:?set NODE_RANK (0 .. NNODES-1) on every node}"
    : "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0, on every node}"
    launch=(--nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="${MASTER_PORT:-29500}")
else
    launch=(--standalone --nnodes=1)
fi

# A recipe file (--config) decides the method; without one this script trains OGM-GE.
method=(--modulation OGM_GE)
for a in "$@"; do case "$a" in --config|--config=*) method=() ;; esac; done
exec "$PYTHON" -m torch.distributed.run "${launch[@]}" --nproc_per_node="$NPROC" \
    code/train.py "${method[@]}" --sync_bn "$@"
