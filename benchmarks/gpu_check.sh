#!/usr/bin/env bash
# One-call GPU check for the device machine (runs under its image's python3 and torch).
#   bash benchmarks/gpu_check.sh            # writes gpu.json / gpu.md / pytest-gpu.log under $OUT
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
timeout 300 python3 benchmarks/gpu.py --out "$OUT"
echo "gpu.py exit: $?"
# The batch-size finder on device memory (issue 13): twice the chosen batch must not fit.
timeout 120 python3 benchmarks/gpu_batchfind.py 2>&1 | tee "$OUT/gpu-batchfind.log" | tail -15
echo "gpu_batchfind.py exit: $?"
# The test suite with CUDA visible (guide snippets need ../shared, absent there: skipped).
timeout 360 python3 -m pytest tests -q -x -p no:cacheprovider --deselect tests/test_guide_snippets.py::test_guide_found \
  2>&1 | tee "$OUT/pytest-gpu.log" | tail -25
