#!/usr/bin/env bash
# Set up a fresh virtual environment (CPU torch) and run the test suite.
# Usage: bash tools/run_tests.sh [pytest args...]
# DIFFSR_CONSTRAINTS=FILE: install the versions pinned there (torch included), e.g. tools/oldest-supported.txt
# (with DIFFSR_VENV=.venv-oldest, so that .venv is left as it is).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DIFFSR_VENV:-.venv}"
PINNED_TORCH="$(grep -s '^torch==' "${DIFFSR_CONSTRAINTS:-/dev/null}" || true)"
TORCH_SPEC="${DIFFSR_TORCH:-${PINNED_TORCH:-torch==2.13.0}}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first, pinned, so the pack's own requirements keep it.
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
echo "$TORCH_SPEC" > "$VENV/constraints.txt"
if [ -n "${DIFFSR_CONSTRAINTS:-}" ]; then
  grep -v '^torch==' "$DIFFSR_CONSTRAINTS" >> "$VENV/constraints.txt"
fi
"$VENV/bin/python" -m pip install -q ".[test]" -c "$VENV/constraints.txt"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$VENV/bin/python" -m pytest -q "$@"
