#!/usr/bin/env bash
# Here, before a session on a GPU machine (the `device` tool): fill .device/ (git-ignored, carried to that machine)
# with what bench/device_check.sh installs there, where nothing can be downloaded:
#   .device/ours/      wheels the pack needs beside that machine's packages (its Python 3.12 has torch, transformers,
#                      huggingface_hub, safetensors, numpy, pillow, pytest; not diffusers)
#   .device/official/  wheels for the official OSEDiff code (diffusers 0.25 as it pins; transformers 4.40, the
#                      oldest with Python 3.12 tokenizer wheels, for its 4.28; huggingface_hub < 0.26 for diffusers 0.25)
#   .device/official_dossr/  wheels for the official DoSSR code (pytorch_lightning 1.4.2 and the torchmetrics it needs,
#                      open_clip_torch 2.24.0, omegaconf; setuptools < 81 for pkg_resources and, on Python 3.12,
#                      distutils)
#   .device/OSEDiff/, .device/DoSSR/  the Python files and configs of local cswry/OSEDiff and AMD-AIG-AIMA/DoSSR
#                      checkouts (never committed: .device/ is ignored)
# Usage: bash tools/device_prepare.sh /path/to/OSEDiff /path/to/DoSSR [PYTHON_VERSION=3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
osediff=${1:?give the path of a cswry/OSEDiff checkout}
dossr=${2:?give the path of an AMD-AIG-AIMA/DoSSR checkout}
py=${3:-3.12}
download() {
  local into=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$into" "$@"
}
rm -rf .device && mkdir -p .device/ours .device/official .device/official_dossr .device/OSEDiff .device/DoSSR
download .device/ours diffusers==0.42.1 importlib_metadata==8.7.0 zipp==3.23.0
download .device/official diffusers==0.25.0 peft==0.9.0 transformers==4.40.2 tokenizers==0.19.1 \
  huggingface_hub==0.25.2
download .device/official_dossr pytorch_lightning==1.4.2 torchmetrics==0.6.0 pyDeprecate==0.3.1 future==1.0.0 \
  open_clip_torch==2.24.0 ftfy==6.3.1 wcwidth==0.2.13 omegaconf==2.4.0 \
  setuptools==80.10.2
copy_sources() {  # checkout, destination: its Python files and YAML configs
  (cd "$1" && find . \( -name '*.py' -o -name '*.yaml' \) -not -path './preset/*' -print0 | tar --null -cf - -T -) |
    tar -xf - -C "$2"
}
copy_sources "$osediff" .device/OSEDiff
copy_sources "$dossr" .device/DoSSR
du -sh .device
