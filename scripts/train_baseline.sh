#!/usr/bin/env bash
# Plain joint training (no modulation) on AV-Digits by default; options pass through.
set -euo pipefail
source "$(dirname "$0")/_env.sh"
exec "$PYTHON" code/train.py --modulation none "$@"
