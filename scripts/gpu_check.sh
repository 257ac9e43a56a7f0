#!/usr/bin/env bash
# The GPU checks and measurements of issue 4 (part 7), in one command, on a CUDA machine:
#   1. the Triton kernels compiled for the card (not the interpreter) against their references,
#      and the gpu-marked tests (CUDA-graph replay, pinned crossings, large GEMV shapes);
#   2. kernel GB/s against the card's measured bandwidth (scripts/bench_gpu.py);
#   3. synthetic models of real shapes (scripts/make_synthetic_gguf.py: SmolLM2-135M's in Q8_0,
#      a 1.1B and a 7B in Q4_0), and on each the num_gpu sweep (scripts/sweep_gpu.py): the
#      planner's predicted tokens/s beside the measured ones from all-CPU to all-GPU, the auto
#      plan against the best point, and the all-GPU decode's GB/s against the card.
#
#   scripts/gpu_check.sh        from the repository. With network: pip install -e '.[test]'
#                               first. Without (the device tool): run scripts/prepare_gpu_run.sh
#                               on a machine with network first and carry .gpu-run.
# Env: OUT (outputs; default gpu-check/), QUICK=1 (skip the 7B), TANDEM_HOME (default /tmp),
#      DRY=1 (no CUDA needed: every step's plumbing on the CPU, the kernels interpreted, the
#      sweeps at num_gpu 0 only; to check this script before spending device time).
# Outputs: $OUT/log.txt (everything), bench_gpu.json, sweep_<model>.json — 5 files.
# Real SmolLM2/gemma3 cannot be pulled without network; their measurements need a machine
# that can pull them: python3 scripts/sweep_gpu.py smollm2 (and gemma3).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"
mkdir -p "$out"
exec > >(tee -a "$out/log.txt") 2>&1
export PYTHONUNBUFFERED=1 TANDEM_HOME="${TANDEM_HOME:-/tmp/tandem-gpu}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .gpu-run/whl ]; then  # carried wheels (no network here)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu-run/whl/*.whl
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
if [ -n "${DRY:-}" ]; then
    QUICK=1 points="--points 0"
else
    python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA')" \
        || exit 1
    unset TRITON_INTERPRET  # the kernels compile for the GPU
    points=""
fi
tok=.gpu-run/tokenizer.gguf
[ -f "$tok" ] || tok=""  # with network, make_synthetic_gguf.py pulls SmolLM2's tokenizer
models=/tmp/tandem-gpu-models
mkdir -p "$models"

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, say how it went, go on
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    echo "=== $name"
    timeout "$limit" "$@"
    echo "=== $name: rc=$? in $((SECONDS - t0)) s"
}

synth() {  # synth NAME SIZE TYPE: a synthetic model, made once
    [ -f "$models/$1.gguf" ] || python3 scripts/make_synthetic_gguf.py --size "$2" --type "$3" \
        ${tok:+--tokenizer-from "$tok"} --out "$models/$1.gguf" 2>/dev/null
}

step nvidia-smi 30 nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.max.memory \
    --format=csv
step kernels 240 python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py \
    tests/test_decode_graph.py -k "not real_model"
step gpu-marked 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_hybrid.py \
    tests/test_quant.py tests/test_triton_kernels.py tests/test_decode_graph.py
step bench-kernels 180 python3 scripts/bench_gpu.py --json --out "$out/bench_gpu.json"
export models tok QUICK="${QUICK:-}"
step synth-models 300 bash -c "$(declare -f synth)"'
    synth smollm2-shape smollm2 q8_0 && synth llama-1b-q4_0 1b q4_0 &&
    { [ -n "$QUICK" ] || synth llama-7b-q4_0 7b q4_0; }'
step sweep-smollm2 180 python3 scripts/sweep_gpu.py "$models/smollm2-shape.gguf" -p 256 -n 64 \
    -r 3 $points --json-out "$out/sweep_smollm2-shape.json"
step sweep-1b 180 python3 scripts/sweep_gpu.py "$models/llama-1b-q4_0.gguf" -p 256 -n 64 -r 3 \
    $points --json-out "$out/sweep_llama-1b-q4_0.json"
if [ -z "${QUICK:-}" ]; then
    step sweep-7b 300 python3 scripts/sweep_gpu.py "$models/llama-7b-q4_0.gguf" -p 128 -n 32 \
        -r 2 --points 0,8,16,24,32 --json-out "$out/sweep_llama-7b-q4_0.json"
fi
echo "outputs in $out/"
