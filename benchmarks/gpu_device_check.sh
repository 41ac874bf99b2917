#!/usr/bin/env bash
# Every node on the device (issue 14, item 3) on a GPU machine, in about a minute. Installs
# nothing: run it where onnxruntime-gpu imports and its CUDA provider loads.
#
#   benchmarks/gpu_device_check.sh [MODEL_DIR] [OUT_DIR]
#
# 1. tests/test_device_check.py: the static checks, every graph of cnnviz.device_check.GRAPHS
#    run on CUDA for a VGG-like and a ResNet-like model (no float node off CUDAExecutionProvider,
#    read from the session profile), and the shipped kernel table against the installed wheel's.
# 2. the installed wheel's CUDA kernel table (OUT_DIR/cuda_kernels_ort.json) and how it differs
#    from the shipped one (OUT_DIR/cuda_kernels_diff.txt); ship it if the test in 1 says so.
# 3. with MODEL_DIR (an exported model folder, e.g. results/models/efficientnet-lite0): every
#    graph of that model on CUDA, its providers, off-device nodes and copies
#    (OUT_DIR/placement.json, OUT_DIR/placement.txt).
# Exits 2 when CUDA is not usable, 1 when a check failed. PYTHON: the interpreter (python3).
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
model="${1:-}"
out="${2:-${OUT:-.}}"
mkdir -p "$out"
py="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$repo/scripts:$repo/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! "$py" -c "import sys; from cnnviz.runtime import cuda_usable; sys.exit(0 if cuda_usable() else 2)"; then
    echo "gpu_device_check.sh: ONNX Runtime's CUDA provider does not load here" >&2
    exit 2
fi
status=0
"$py" -m pytest -q -p no:cacheprovider -rs "$repo/tests/test_device_check.py" 2>&1 \
    | tee "$out/device_check_tests.log" || status=1
table="$repo/scripts/tools/cuda_kernel_table.py"
if "$py" "$table" ort > "$out/cuda_kernels_ort.json"; then
    "$py" "$table" compare "$repo/scripts/cnnviz/data/cuda_kernels_1_31.json" \
        "$out/cuda_kernels_ort.json" > "$out/cuda_kernels_diff.txt"
    echo "kernel table rows that differ from the wheel's: $(wc -l < "$out/cuda_kernels_diff.txt")"
else
    status=1
fi
if [[ -n $model ]]; then
    "$py" -m cnnviz.device_check "$model" --device cuda --json "$out/placement.json" \
        | tee "$out/placement.txt" || status=1
fi
exit $status
