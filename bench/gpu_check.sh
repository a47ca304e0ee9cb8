#!/usr/bin/env bash
# GPU verification in one go, for a machine with CUDA (see bench/README.md, "GPU"):
#   1. the whole test suite with --device auto, i.e. on the GPU wherever a test does not pin the CPU, the CUDA-only
#      tests included (CPU/GPU agreement, GPU chunk invariance, the VRAM bound, merge --json's peak_vram);
#   2. a Qwen1.5-14B-shaped family (generated meanwhile) merged with --device cuda --max-vram 8GiB:
#      once directly (merge --json: peak VRAM), then by bench/run.py against the I/O floor, cold cache;
#   3. bench/vram_probe.py: per-tensor GPU memory against the plan, for every method.
#
#   bench/gpu_check.sh OUTDIR [MODELS_DIR]
#
# Works without installing the project: PYTHONPATH points at this checkout and a small `streammerge` shim
# is put on PATH when none is installed. PYTHON (default python3) picks the interpreter.
set -u
OUT=${1:?usage: bench/gpu_check.sh OUTDIR [MODELS_DIR]}
MODELS=${2:-bench/models/qwen1.5-14b-8layers}
. "$(dirname "$0")/checkout_env.sh"  # ROOT (the working directory), PY, SM, step(); OUT created

step machine
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c 'import torch, numpy, safetensors, click, psutil, tqdm; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0))'
echo "cpus $(nproc), $(free -g | awk '/Mem:/{print $2}') GiB RAM"; df -h "$ROOT" | tail -1

step "generating $MODELS in the background"
"$PY" bench/make_models.py --shape qwen1.5-14b-8layers --dtype bf16 --out "$MODELS" --jobs 3 >"$OUT/generate.log" 2>&1 &
GEN=$!

step "whole suite, --device auto (the GPU)"
XDIST=$("$PY" -c 'import xdist' 2>/dev/null && echo "-n 8")
timeout "${SUITE_TIMEOUT:-300}" "$PY" -m pytest -q -p no:cacheprovider -rfEs $XDIST tests >"$OUT/test_all.log" 2>&1
echo "exit $?"; grep -E "passed|failed|error" "$OUT/test_all.log" | tail -3
grep -E "^(FAILED|ERROR)" "$OUT/test_all.log" | head -40
grep -E "^SKIPPED" "$OUT/test_all.log" | head -20

step "waiting for the generator"
wait $GEN; echo "exit $?"; tail -5 "$OUT/generate.log"

step "14B-shaped WIDEN, --device cuda --max-vram 8GiB (merge --json)"
rm -rf /tmp/m14
/usr/bin/time -v "$SM" merge --base "$MODELS/base" --model "$MODELS/chat" --model "$MODELS/multilingual" \
    --out /tmp/m14 --device cuda --max-vram 8GiB --max-ram "${MAX_RAM:-4GiB}" --json \
    >"$OUT/merge14.json" 2>"$OUT/merge14.time"
echo "exit $?"; cat "$OUT/merge14.json"
grep -E "Elapsed|Maximum resident" "$OUT/merge14.time"
rm -rf /tmp/m14

step "bench/run.py: floor and merges on the GPU"
"$PY" bench/run.py --models "$MODELS" --method "${METHODS:-widen,task_arithmetic,ties}" --max-ram "${MAX_RAM:-4GiB}" \
    --param ties:density=0.5 --extra-arg=--device=cuda --extra-arg=--max-vram=8GiB \
    --streammerge "$SM" --python "$PY" --work /tmp/sm-bench-work --results "$OUT" \
    --note "GPU check (bench/gpu_check.sh)" 2>&1 | tail -40

step "bench/vram_probe.py: GPU memory per tensor against the plan, every method"
"$PY" bench/vram_probe.py --results "$OUT" 2>&1 | tail -45
