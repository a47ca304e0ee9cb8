#!/usr/bin/env bash
# Scaling on a machine with more cores than this one (e.g. the lent GPU machine's 16), in one go (see
# bench/README.md, "Compute workers, and a busy machine"):
#   1. the Qwen2-0.5B-shaped family generated (make_models.py --jobs 3: one process per model, the same bytes);
#   2. bench/threads.py: warm page cache, quiet machine, task_arithmetic, TIES and WIDEN at --threads 1,2,4,...
#      up to the CPUs (THREADS overrides), three rounds (ROUNDS): the scaling table (speed-up over one thread, share
#      of linear, the plan's workers at each count; each cell's median round) and its plot;
#   3. bench/job_bound.py at one thread: the largest job's bound on the speed-up at 2, 4, 8 and 16 workers.
#
#   bench/cores_check.sh OUTDIR [MODELS_DIR]
#
# About 5 minutes on a 16-core machine. Works without installing the project: PYTHONPATH points at this checkout
# and a small `streammerge` shim is put on PATH when none is installed (as bench/gpu_check.sh). PYTHON (default
# python3) picks the interpreter; MAX_RAM (default 1GiB) the budget; METHODS the methods.
set -u
OUT=${1:?usage: bench/cores_check.sh OUTDIR [MODELS_DIR]}
MODELS=${2:-bench/models/qwen2-0.5b}
. "$(dirname "$0")/checkout_env.sh"  # ROOT (the working directory), PY, SM, step(); OUT created
CPUS=$("$PY" -c 'import os; print(len(os.sched_getaffinity(0)))')
if [ -z "${THREADS:-}" ]; then
    THREADS=1; t=2
    while [ "$t" -lt "$CPUS" ]; do THREADS="$THREADS,$t"; t=$((t * 2)); done
    THREADS="$THREADS,$CPUS"
fi

step machine
"$PY" -c 'import os, platform, psutil, numba, torch; print(platform.processor() or platform.machine(), "|",
len(os.sched_getaffinity(0)), "CPUs,", psutil.cpu_count(logical=False), "physical cores,",
round(psutil.virtual_memory().total / 2**30), "GiB | numba", numba.__version__, "| torch", torch.__version__)'
"$SM" --version
df -h "$ROOT" | tail -1

step "generating $MODELS"
"$PY" bench/make_models.py --shape qwen2-0.5b --dtype bf16 --out "$MODELS" --jobs 3 >"$OUT/generate.log" 2>&1
echo "exit $?"; tail -2 "$OUT/generate.log"

step "bench/threads.py --threads $THREADS (quiet)"
"$PY" bench/threads.py --models "$MODELS" --method "${METHODS:-task_arithmetic,ties,widen}" --threads "$THREADS" \
    --busy 0 --rounds "${ROUNDS:-3}" --max-ram "${MAX_RAM:-1GiB}" --streammerge "$SM" --results "$OUT" 2>&1 | tail -40

step "bench/job_bound.py (the largest job's bound)"
"$PY" bench/job_bound.py --models "$MODELS" --method widen,ties --param ties:density=0.5 \
    --max-ram "${MAX_RAM:-1GiB}" --results "$OUT" 2>&1 | tail -8
