#!/usr/bin/env bash
# GPU checks for anyone with a CUDA card: the Triton kernels compiled for real (not the
# interpreter) against their references, the gpu-marked tests, kernel GB/s against the
# card's measured bandwidth, and the planner with this machine's measured speeds.
#
#   scripts/gpu_check.sh            (from the repository, after pip install -e '.[test]')
#
# Writes its outputs under ${OUT:-gpu-check}/.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"
mkdir -p "$out"
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
unset TRITON_INTERPRET  # the tests then compile the kernels for the GPU
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.max.memory --format=csv \
    | tee "$out/nvidia-smi.csv" || true
python3 -m pytest -q tests/test_triton_kernels.py 2>&1 | tee "$out/test_triton_kernels.txt"
python3 -m pytest -q -m gpu 2>&1 | tee "$out/test_gpu_marked.txt"
python3 scripts/bench_gpu.py --json > "$out/bench_gpu.json"
python3 scripts/bench_gpu.py | tee "$out/bench_gpu.txt"
tandem plan smollm2 --recalibrate --json > "$out/plan_smollm2.json"
tandem plan smollm2 | tee "$out/plan_smollm2.txt"
echo "outputs in $out/"
