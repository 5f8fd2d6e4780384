# Sourced by the scripts: run from the repository root with the project's Python.
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
