#!/usr/bin/env bash
# Every per-image method on an NVIDIA GPU (ONNX Runtime CUDA provider): images/s per job and
# steady, against the plain forward, CUDA-vs-CPU map agreement, node placement; with --peers,
# pytorch-grad-cam and captum on the same GPU. Installs nothing: run it in the repository's
# installed environment (plus the peers for --peers). Results: benchmarks/GPU.md.
#
#   benchmarks/gpu.sh [MODEL_DIR] [bench_gpu.py options, e.g. --peers --out gpu.md]
#
# MODEL_DIR: a folder with an exported model.json (EfficientNet-Lite0, e.g. results/models/
# efficientnet-lite0); without it the script exports EfficientNet-Lite0 with cnnviz's export code
# (needs the export extras: torch). Exits 2 when CUDA is not usable. To test the code path on a
# machine without a GPU: benchmarks/gpu.sh --device cpu --images 2 --batch 2 --repeats 1
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
args=()
if [[ $# -gt 0 && $1 != -* ]]; then
    args+=(--model-dir "$1")
    shift
fi
device=cuda
for arg in "$@"; do
    if [[ $arg == cpu || $arg == --device=cpu ]]; then device=cpu; fi
done
if [[ $device == cuda ]] && ! command -v nvidia-smi > /dev/null; then
    echo "gpu.sh: nvidia-smi not found: no NVIDIA driver here (use --device cpu to test)" >&2
    exit 2
fi
export PYTHONPATH="$repo/scripts${PYTHONPATH:+:$PYTHONPATH}"
exec timeout "${GPU_BENCH_TIMEOUT:-290}" python3 "$repo/benchmarks/bench_gpu.py" "${args[@]}" "$@"
