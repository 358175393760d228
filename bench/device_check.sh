#!/usr/bin/env bash
# The GPU checks of issue #7 on a CUDA machine (the `device` tool), after tools/device_prepare.sh here. The device
# budget (15 min with each machine start, 1–3 min, at most 590 s a call) takes two calls, the second made at once
# (the machine goes back after 30 s idle):
#   1. run(command="bash bench/device_check.sh", carry=[".device"], timeout_s=590)
#      the default steps: official_osediff official_dossr osediff dossr precision memory, the issue's figures in
#      that order (the side-by-side ratios with the official code, ours at fp16/bf16 128→512, 512→2048 latency and
#      GPU peaks, precision, then the memory network by network). Estimated 6.5–8 min on an H100/H200: stop 29's
#      H200 minutes 1.3 / 1.8 / 3.5 / 2.6 / 0.9 for the first five (memory never ran: 1.5–2 estimated), less the
#      cases moved to osediff_more / dossr_more (3 of osediff's 6 processes, 1 of dossr's 4) and less the
#      random-weight builds read from DIFFSR_BENCH_CACHE instead (11–18 s of one core each before, a few s now:
#      14 of the call's 15 builds, 2–3.5 min): about 15 s install, then 1.2 / 1.8 / 1–1.5 / 1.2–1.5 / 0.5 / 0.6–1.2
#   2. at once, with what status says is left:
#      run(command="bash bench/device_check.sh tests stages osediff_more decoder dossr_more", carry=[".device"],
#          timeout_s=<budget_left_s − 30>)
#      tests 0.8, stages 1–1.5, osediff_more (fp32 128 px, fp16 1024→4096, bf16 512→2048) 1–1.5, decoder 0.5,
#      dossr_more (fp32 128 px) 0.3 min: about 4–5 min, in order of worth, so one cut short keeps the first ones
#   compile (torch.compile, 7–9 min estimated: first runs include the compilation) is last and optional: only in a
#   call of its own with a fresh budget. `all` runs every step in this order, compile last.
#   bash bench/device_check.sh [STEP ...]
#   steps: official_osediff official_dossr osediff dossr precision memory tests stages osediff_more decoder dossr_more
#          compile, or all
# The random-weight models are built once per machine into DIFFSR_BENCH_CACHE (default /tmp/diffsr-bench-cache; a
# second call on the same warm machine reuses them; bench/common.py cached_random_weights).
# Writes env.txt, log.txt, tests.log and one JSON per measurement to $RESULTS (default /tmp/device_check), and after
# each measurement packs them into $OUT/device_check.tgz (the device tool brings back at most 8 files), beside
# log.txt, so a call stopped at its time limit keeps every measurement it finished. A failing step does not stop
# the next; a failing case's traceback is in log.txt. DEVICE=cpu QUICK=1 runs the same steps on the CPU at the
# smallest sizes, in float32 (a dry run); its PYTHON needs what the GPU machine's image has besides torch and
# transformers: torchvision, accelerate, pytest, tensorboard (pytorch_lightning 1.4 imports it) and cv2 (the
# official DoSSR imports it). At QUICK sizes OSEDiff still runs at 512 px (smaller inputs are enlarged to its
# process size): its cases take the dry run longest.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device_check}
RESULTS=${RESULTS:-/tmp/device_check}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
PY=${PYTHON:-python3}
first="official_osediff official_dossr osediff dossr precision memory"
steps=${*:-$first}
[ "$steps" = all ] && steps="$first tests stages osediff_more decoder dossr_more compile"
mkdir -p "$OUT" "$RESULTS"
exec > >(tee -a "$RESULTS/log.txt") 2>&1
keep() {  # the results so far into $OUT
  [ "$RESULTS" -ef "$OUT" ] || { tar -czf "$OUT/device_check.tgz" -C "$RESULTS" . && cp "$RESULTS/log.txt" "$OUT/"; }
}
step() { keep; echo "== $(date +%T) $*"; }
py() { "$PY" "$@"; local rc=$?; keep; return $rc; }  # one measurement, kept as soon as it ends
quick() { [ "$QUICK" = 1 ] && echo "$1" || echo "$2"; }
on_gpu() { [ "$DEVICE" = cpu ] && echo fp32 || echo "$1"; }  # the CPU dry run computes in float32 (fast there)
fp16=$(on_gpu fp16) bf16=$(on_gpu bf16)

step install
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/diffsr-site .device/ours/*.whl
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/diffsr-official \
  .device/official/*.whl
mkdir -p /tmp/diffsr-pkg && ln -sfn "$PWD" /tmp/diffsr-pkg/comfyui_diffsr  # the package's import name
export PYTHONPATH=/tmp/diffsr-site:/tmp/diffsr-pkg HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
# the random-weight models built once per machine, each later case filled from the file (bench/common.py
# cached_random_weights): 11–18 s of one CPU core saved per build
export DIFFSR_BENCH_CACHE=${DIFFSR_BENCH_CACHE:-/tmp/diffsr-bench-cache}
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/diffsr-official-dossr \
  .device/official_dossr/*.whl
for official in official official-dossr; do  # the official code's packages first, then the machine's
  printf '#!/bin/sh\nPYTHONPATH=/tmp/diffsr-%s:$PYTHONPATH exec %s "$@"\n' $official "$(command -v "$PY")" \
    > /tmp/diffsr-$official-python
  chmod +x /tmp/diffsr-$official-python
done
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
  "$PY" -c "import torch, diffusers, transformers
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__,
      'transformers', transformers.__version__)"
  echo "cpus $(nproc)"; } > "$RESULTS/env.txt"
cat "$RESULTS/env.txt"

osediff() {  # dtype sizes repeats warmup name [flags]
  py bench/bench_osediff.py --device "$DEVICE" --dtype "$1" --sizes $2 --repeats "$3" --warmup "$4" \
    --out "$RESULTS/osediff_${DEVICE}_$5.json" "${@:6}" > /dev/null
}
dossr() {  # dtype sizes repeats name [flags]
  py bench/bench_dossr.py --device "$DEVICE" --dtype "$1" --sizes $2 --repeats "$3" \
    --out "$RESULTS/dossr_${DEVICE}_$4.json" "${@:5}" > /dev/null
}
small=$(quick 32 128)
for s in $steps; do
  step "$s"
  case $s in
    tests)
      DIFFSR_TEST_DEVICE=$DEVICE py -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "not compiled" \
        > "$RESULTS/tests.log" 2>&1
      tail -n 5 "$RESULTS/tests.log";;
    precision)
      py bench/precision.py --device "$DEVICE" --size "$small" --dtypes $(quick bf16 "fp16 bf16") \
        --out "$RESULTS/precision_$DEVICE.json" > /dev/null;;
    osediff)  # 128 px: 3 runs of warm-up (the first timed run after one was still 1.7x slower at stop 29)
      osediff "$fp16" "$small" "$(quick 2 10)" "$(quick 1 3)" fp16_128
      osediff "$bf16" "$small" "$(quick 2 10)" "$(quick 1 3)" bf16_128
      osediff "$fp16" "$(quick 48 512)" 2 "$(quick 0 1)" fp16_512;;
    osediff_more)
      osediff fp32 "$small" "$(quick 2 5)" "$(quick 1 2)" fp32_128
      osediff "$fp16" "$(quick 48 1024)" 2 "$(quick 0 1)" fp16_1024
      osediff "$bf16" "$(quick 48 512)" 2 "$(quick 0 1)" bf16_512;;
    official_osediff)  # the official code at its fp16 (mixed_precision fp16), ours at its CUDA default, fp16
      py bench/bench_osediff.py --device "$DEVICE" --dtype "$fp16" --sizes "$small" --repeats "$(quick 2 10)" \
        --warmup "$(quick 1 3)" --compare-official "$PWD/.device/OSEDiff" \
        --official-python /tmp/diffsr-official-python --out "$RESULTS/osediff_${DEVICE}_fp16_vs_official.json" \
        > /dev/null;;
    official_dossr)  # the official code in float32 (its only precision), ours at its CUDA default, fp16; 128 px
      py bench/bench_dossr.py --device "$DEVICE" --dtype "$fp16" --repeats "$(quick 1 5)" \
        --compare-official "$PWD/.device/DoSSR" --official-python /tmp/diffsr-official-dossr-python \
        --out "$RESULTS/dossr_${DEVICE}_fp16_vs_official.json" > /dev/null;;
    dossr)
      dossr "$fp16" "$small" "$(quick 1 5)" fp16_128
      dossr "$bf16" "$small" "$(quick 1 5)" bf16_128
      dossr "$fp16" "$(quick 48 512)" 1 fp16_512;;
    dossr_more)
      dossr fp32 "$small" "$(quick 1 5)" fp32_128;;
    compile)  # torch.compile of the diffusion networks (--compile): first_run_s includes the compilation
      DIFFSR_TEST_DEVICE=$DEVICE py -m pytest -q -p no:cacheprovider tests/test_cuda.py -k compiled \
        > "$RESULTS/tests_compile.log" 2>&1
      tail -n 3 "$RESULTS/tests_compile.log"
      py bench/precision.py --device "$DEVICE" --size "$small" --dtypes $(quick fp32+compile fp16+compile) \
        --methods osediff --out "$RESULTS/precision_${DEVICE}_compile.json" > /dev/null
      osediff "$fp16" "$small" "$(quick 2 10)" "$(quick 1 3)" fp16_128_compile --compile
      osediff "$bf16" "$small" "$(quick 2 10)" "$(quick 1 3)" bf16_128_compile --compile
      dossr "$fp16" "$small" "$(quick 1 5)" fp16_128_compile --compile;;
    stages)  # where the time goes, network by network, and the device's kernel time against the wall time
      py bench/bench_stages.py --device "$DEVICE" --dtype "$fp16" --size "$small" --repeats "$(quick 1 10)" --profile \
        --out "$RESULTS/stages_${DEVICE}_fp16.json" > /dev/null
      py bench/bench_stages.py --device "$DEVICE" --dtype "$bf16" --method osediff --size "$small" \
        --repeats "$(quick 1 10)" --out "$RESULTS/stages_${DEVICE}_bf16.json" > /dev/null;;
    memory)  # the peak network by network (against bench_memory.py's meta count, which has no workspace), at
      # 512→2048 with the default decoder tile (224 latent px) and smaller ones: which fits in 4 GB, how fast
      py bench/bench_memory.py --device "$([ "$DEVICE" = cpu ] && echo meta || echo "$DEVICE")" --dtype fp16 \
        --sizes $(quick 48 "128 512") --vae-tile-decode 224 96 64 --out "$RESULTS/memory_${DEVICE}_fp16.json" \
        > /dev/null
      # as on a 4 GB card (3815 MiB in all, less what the process holds outside PyTorch's allocator): the networks
      # of other stages moved off when short
      py bench/bench_memory.py --device "$([ "$DEVICE" = cpu ] && echo meta || echo "$DEVICE")" --dtype fp16 \
        --sizes $(quick 48 "128 512") --budget-mib 3815 --out "$RESULTS/memory_${DEVICE}_fp16_4gb.json" > /dev/null
      osediff "$fp16" "$(quick 48 512)" 2 "$(quick 0 1)" fp16_512_decode96 --vae-tile-decode 96;;
    decoder)  # do fast_modules (four 2×2 convolutions per ×2 upsampler, channels-last) pay on this device?
      py bench/bench_decoder_modules.py --device "$DEVICE" --dtype "$fp16" --latents $(quick 8 "64 128") \
        --repeats "$(quick 1 20)" --warmup "$(quick 0 3)" --out "$RESULTS/decoder_modules_${DEVICE}_fp16.json" \
        > /dev/null;;
    *) echo "unknown step $s";;
  esac
done
step done
ls -l "$OUT"
