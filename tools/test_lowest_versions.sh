#!/usr/bin/env bash
# Runs the test suite in a fresh virtual environment holding the lowest
# versions setup.cfg allows (TensorFlow 2.19.0, Keras 3.15.1, keras-tuner
# 1.4.8), to check that its lower bounds are honest. Not part of .ci/run:
# it downloads about 1 GB.
#
#     tools/test_lowest_versions.sh [VENV_DIR] [-- PYTEST_ARGS...]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-$(mktemp -d)/venv}"
shift || true
[ "${1:-}" = "--" ] && shift
lowest=("tensorflow==2.19.0" "keras==3.15.1" "keras-tuner==1.4.8")
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "${lowest[@]}" -e ".[test]"
"$venv/bin/python" -m pip list 2>/dev/null | grep -E "^(tensorflow|keras|keras-tuner|numpy) "
"$venv/bin/python" -m pytest -p no:cacheprovider "$@"
