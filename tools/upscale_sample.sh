#!/usr/bin/env bash
# Upscale the sample image with OSEDiff, setting everything up on first use:
# a virtual environment with the pack, and the official weights (SD 2.1-base and osediff.pkl)
# downloaded into ./models — running this script is the opt-in to that download (about 5.3 GB).
# Usage: bash tools/upscale_sample.sh [extra osediff args...]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${DIFFSR_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "${DIFFSR_TORCH:-torch}"
"$VENV/bin/python" -m pip install -q .
"$VENV/bin/python" -m comfyui_diffsr download sd21-base osediff --models-dir models
# run again, it keeps the earlier output (pass --overwrite to replace it); ${keep[@]+…}: an empty array under
# set -u is an error in bash before 4.4 (macOS's /bin/bash is 3.2)
case " $* " in *" --overwrite "*|*" --skip-existing "*) keep=() ;; *) keep=(--skip-existing) ;; esac
"$VENV/bin/python" -m comfyui_diffsr osediff sample/astronaut_128.png -o output \
  --base models/checkpoints/v2-1_512-ema-pruned.safetensors --weights models/osediff/osediff.pkl ${keep[@]+"${keep[@]}"} "$@"
