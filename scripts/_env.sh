# Sourced by the scripts: run from the repository root with the project's Python.
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# A recipe file (--config FILE) decides the method itself: the scripts add their own
# --modulation only without one (options on the command line still win over the file).
has_config() { local a; for a in "$@"; do case "$a" in --config|--config=*) return 0 ;; esac; done; return 1; }
