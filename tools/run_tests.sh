#!/usr/bin/env bash
# Set up a fresh virtual environment (CPU torch) and run the test suite.
# Usage: bash tools/run_tests.sh [pytest args...]
# DIFFSR_CONSTRAINTS=FILE: install the versions pinned there (torch included), e.g. tools/oldest-supported.txt
# (with DIFFSR_VENV=.venv-oldest, so that .venv is left as it is).
# DIFFSR_PYTHON=PATH: the interpreter the venv is made with (default python3), e.g. ~/.pyenv/versions/3.13.0/bin/python3
# (with a DIFFSR_VENV of its own: a venv of another Python version is refused). Relative paths are taken from the
# checkout.
# DIFFSR_WITH=REQUIREMENT: a package installed beside the pack's (under the same constraints), e.g. accelerate==0.33.0.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DIFFSR_VENV:-.venv}"
PYTHON="${DIFFSR_PYTHON:-python3}"
if [ -n "${DIFFSR_PYTHON:-}" ] && ! "$PYTHON" -c '' 2>/dev/null; then
  echo "ERROR: DIFFSR_PYTHON ($PYTHON) does not run (a relative path is taken from the checkout, $PWD)." >&2
  exit 1
fi
PINNED_TORCH="$(grep -s '^torch==' "${DIFFSR_CONSTRAINTS:-/dev/null}" || true)"
TORCH_SPEC="${DIFFSR_TORCH:-${PINNED_TORCH:-torch==2.13.0}}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
if [ -n "${DIFFSR_PYTHON:-}" ]; then
  python_version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])'; }
  if [ "$(python_version "$VENV/bin/python")" != "$(python_version "$PYTHON")" ]; then
    echo "ERROR: $VENV has Python $(python_version "$VENV/bin/python"), DIFFSR_PYTHON ($PYTHON) is" \
         "$(python_version "$PYTHON"): give it a DIFFSR_VENV of its own." >&2
    exit 1
  fi
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first, pinned, so the pack's own requirements keep it.
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
echo "$TORCH_SPEC" > "$VENV/constraints.txt"
if [ -n "${DIFFSR_CONSTRAINTS:-}" ]; then
  grep -v '^torch==' "$DIFFSR_CONSTRAINTS" >> "$VENV/constraints.txt"
fi
"$VENV/bin/python" -m pip install -q ".[test]" ${DIFFSR_WITH:+"$DIFFSR_WITH"} -c "$VENV/constraints.txt"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$VENV/bin/python" -m pytest -q "$@"
