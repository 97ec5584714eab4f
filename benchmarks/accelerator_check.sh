#!/usr/bin/env bash
# Issue 16's accelerator check in one command, for a short lease of a GPU/TPU machine (the `device` tool):
# float32 and bfloat16 Grow and Improve on JAX's default device, with MFU over the chip's bf16 spec sheet,
# the measured matmul peak and the device's peak memory (benchmarks/dtype_benchmark.py --accelerator).
#   bash benchmarks/accelerator_check.sh                      # the IWSLT shape at the CPU table's sizes
#   bash benchmarks/accelerator_check.sh --sources 256 --batch 256   # sizes that fill a GPU better (the README's)
# The model, sampler and train step import without TensorFlow or seqio (an accelerator image may lack them);
# the two small pure-Python packages they do need travel as wheels in .whl/ when the machine lacks them
# (benchmarks/README.md, "On an accelerator"). Results go to $OUT (the device tool's folder) or the current one.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/rest_jax_site .whl/*.whl
  export PYTHONPATH=/tmp/rest_jax_site${PYTHONPATH:+:$PYTHONPATH}
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$py" -c "import jax; print('jax', jax.__version__, jax.devices())"
"$py" benchmarks/dtype_benchmark.py --accelerator --json "${OUT:-.}/accelerator_check.json" "$@"
