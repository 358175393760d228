#!/usr/bin/env bash
# Here, before a session on a GPU machine (the `device` tool): fill .device/ (git-ignored, carried to that machine)
# with what bench/device_check.sh installs there, where nothing can be downloaded:
#   .device/ours/      wheels the pack needs beside that machine's packages (its Python 3.12 has torch, transformers,
#                      huggingface_hub, safetensors, numpy, pillow, pytest; not diffusers)
#   .device/official/  wheels for the official OSEDiff code (diffusers 0.25 as it pins; transformers 4.40, the
#                      oldest with Python 3.12 tokenizer wheels, for its 4.28; huggingface_hub < 0.26 for diffusers 0.25)
#   .device/OSEDiff/   the Python files of a local cswry/OSEDiff checkout (never committed: .device/ is ignored)
# Usage: bash tools/device_prepare.sh /path/to/OSEDiff [PYTHON_VERSION=3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
checkout=${1:?give the path of a cswry/OSEDiff checkout}
py=${2:-3.12}
download() {
  local into=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$into" "$@"
}
rm -rf .device && mkdir -p .device/ours .device/official .device/OSEDiff
download .device/ours diffusers==0.42.1 importlib_metadata==8.7.0 zipp==3.23.0
download .device/official diffusers==0.25.0 peft==0.9.0 transformers==4.40.2 tokenizers==0.19.1 \
  huggingface_hub==0.25.2
(cd "$checkout" && find . -name '*.py' -not -path './preset/*' -print0 | tar --null -cf - -T -) | tar -xf - -C .device/OSEDiff
du -sh .device
