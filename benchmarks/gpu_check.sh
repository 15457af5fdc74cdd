#!/bin/sh
# The GPU proof, on one CUDA machine, nothing downloaded (under 8 minutes on one modern GPU): builds a
# full-size SD-1.5 inpainting checkpoint with random weights in the release layout, runs the test
# suite on CUDA, times the Stage 2 LoRA step (fp16, batch 6, 512 px; gradient checkpointing on/off;
# cached latents vs re-encoding; peak memory), 2-process training when 2 GPUs exist, and Stage 3
# throughput at batch 1/4/8 against one pipeline call per image; writes benchmarks/results/gpu.md.
#
#   sh benchmarks/gpu_check.sh                          # everything
#   sh benchmarks/gpu_check.sh --parts generation       # parts: tests,train_step,multi_gpu,generation
#   PYTHON=.venv/bin/python sh benchmarks/gpu_check.sh
#
# Needs torch (CUDA), accelerate, peft, transformers, opencv, scikit-image and pytest. Without
# diffusers it installs the wheel in benchmarks/wheels/ (no network needed); to refresh that wheel, on
# a machine with internet: pip download diffusers==0.42.1 --no-deps -d benchmarks/wheels
set -e
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

if ! "$PYTHON" -c "import diffusers" 2>/dev/null; then
    wheel=$(ls benchmarks/wheels/diffusers-*.whl 2>/dev/null | tail -n 1)
    if [ -z "$wheel" ]; then
        echo "gpu_check.sh: error: diffusers is not installed and benchmarks/wheels/ holds no diffusers wheel; run: pip install -r requirements.txt (or pip download diffusers==0.42.1 --no-deps -d benchmarks/wheels)" >&2
        exit 1
    fi
    echo "installing $wheel (diffusers was missing)"
    "$PYTHON" -m pip install -q --no-deps "$wheel"
fi
exec "$PYTHON" -m benchmarks.gpu_check "$@"
