# Sourced by the one-go checks (gpu_check.sh, cores_check.sh) on a machine where the project is not installed:
# runs from the checkout's root (ROOT) with PYTHONPATH pointing at it, PY the interpreter (PYTHON, default
# python3), SM a `streammerge` command (the installed one, else a small shim that runs this checkout's CLI with
# PY), OUT created, and step() printing a timed section heading.
PY=${PYTHON:-python3}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
step() { printf '\n== %s (%s)\n' "$*" "$(date -u +%T)"; }

if ! command -v streammerge >/dev/null; then
    mkdir -p /tmp/streammerge-shim
    printf '#!/bin/sh\nexec %s -m streammerge.cli "$@"\n' "$(command -v "$PY")" >/tmp/streammerge-shim/streammerge
    chmod +x /tmp/streammerge-shim/streammerge
    export PATH="/tmp/streammerge-shim:$PATH"
fi
SM=$(command -v streammerge)
