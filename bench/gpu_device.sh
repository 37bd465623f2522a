#!/usr/bin/env bash
# The GPU benchmark as ONE run on a lent GPU machine (DEVELOPERS.md: the device tool runs this in the repository root
# with $OUT for results; torch + CUDA, onnx and numpy are there, the rest travels as wheels in .gpu-wheels/, carried
# with the tree). Prepare here:  pip download --no-deps -d .gpu-wheels segment-anything==1.0 pillow
# Run there:                    bash bench/gpu_device.sh   (about 5 minutes on an H100; bench/gpu.py's own limit is 8)
# Then copy $OUT/gpu_*.json into bench/results/ and commit it with the note of which card gave it.
set -euo pipefail
out="${OUT:-bench/results}"
if compgen -G ".gpu-wheels/*.whl" > /dev/null; then
  python -m pip install -q --no-deps --no-index .gpu-wheels/*.whl
fi
nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv | tee "$out/nvidia-smi.csv"
export PYTHONPATH="service:build:tools:.${PYTHONPATH:+:$PYTHONPATH}"
timeout 480 python -m bench.gpu --device cuda --out "$out" 2>&1 | tee "$out/gpu.log"
