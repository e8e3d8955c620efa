#!/usr/bin/env bash
# The GPU check in one command: the CUDA tests (pytest -m cuda), then the benchmark that writes
# bench/GPU.md. Extra arguments go to bench/bench_gpu.py. On a machine without a GPU it says so
# and exits 0. PYTHON picks the interpreter (default: .venv/bin/python, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "bench/gpu.sh: $PYTHON cannot import torch (set PYTHON=path/to/python)" >&2
    exit 1
fi
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "bench/gpu.sh: no CUDA GPU visible to torch, skipped (run it on a machine with a GPU)"
    exit 0
fi
"$PYTHON" -c "import torch; print('GPUs:', [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
status=0
"$PYTHON" -m pytest -q -p no:cacheprovider -m cuda tests || status=$?
"$PYTHON" bench/bench_gpu.py "$@" || status=$?
exit $status
