# syntax=docker/dockerfile:1
# Triton for GPU nodes: NVIDIA's Triton release image plus what the serving target's python-backend models import
# (the samserve wheel: samserve.backends.python_model; ONNX Runtime and OpenVINO for the cpu-* targets; PyTorch for gpu-torch). Built from the repository root:
#   docker build -f deploy/docker/triton.Dockerfile -t REGISTRY/samserve-triton:0.1.0-24.12 .
# TRITON_RELEASE is the one pin of NVIDIA's release: the chart's values.yaml `tritonRelease` (Triton and the
# TensorRT engine Job's container) must equal it (tests/deploy checks). 24.12 is the first release on Ubuntu 24.04
# with Python 3.12 (samserve needs Python >= 3.11; earlier releases ship 3.10).
ARG TRITON_RELEASE=24.12
ARG PYTHON_VERSION=3.12
# pyproject's [project] version (a test checks): names the wheel.
ARG SAMSERVE_VERSION=0.1.0

# The wheel, built as in gateway.Dockerfile, on the Python of the Triton image.
FROM python:${PYTHON_VERSION}-slim-bookworm AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_NO_INPUT=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY protos protos
COPY service service
COPY build build
COPY model_repository model_repository
RUN python -m pip install --disable-pip-version-check -q "setuptools>=69" "wheel" "grpcio-tools>=1.75,<1.81" "googleapis-common-protos>=1.63"
RUN python -m pip wheel --no-deps --no-build-isolation --disable-pip-version-check -q -w /dist /src

FROM nvcr.io/nvidia/tritonserver:${TRITON_RELEASE}-py3
ARG PYTHON_VERSION
ARG SAMSERVE_VERSION
ENV PIP_NO_CACHE_DIR=1 PIP_NO_INPUT=1 PYTHONDONTWRITEBYTECODE=1
COPY --from=wheel /dist /dist
# A venv beside the image's Python (its pip refuses system installs, PEP 668); the python backend's stub finds it
# through PYTHONPATH (numpy < 2 from the wheel's requirements wins over the image's own). Ubuntu's python3 has no
# venv module without python3-venv (a no-op where the release image has it already).
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends python3-venv && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/samserve
# SAMSERVE_EXTRAS=gpu for the gpu-torch target (PyTorch with CUDA and segment-anything in the python backend, about
# 3 GB more), tagged apart because the chart names that image <appVersion>-<tritonRelease>-torch:
#   docker build -f deploy/docker/triton.Dockerfile --build-arg SAMSERVE_EXTRAS=gpu -t REGISTRY/samserve-triton:0.1.0-24.12-torch .
# Empty for cpu-onnxruntime, cpu-openvino and gpu-tensorrt (plans run in Triton's own TensorRT backend).
# tests/e2e/test_gpu_python_layer.py installs exactly this step's packages for each value and loads every runtime.
ARG SAMSERVE_EXTRAS=""
RUN /opt/samserve/bin/python -m pip install --disable-pip-version-check -q "/dist/samserve-${SAMSERVE_VERSION}-py3-none-any.whl${SAMSERVE_EXTRAS:+[$SAMSERVE_EXTRAS]}" "onnxruntime>=1.17" "openvino>=2024.0"
ENV PYTHONPATH=/opt/samserve/lib/python${PYTHON_VERSION}/site-packages PYTHONUNBUFFERED=1
# A non-root user without a home (the chart runs every pod as 65532, with a read-only root file system).
USER 65532:65532
EXPOSE 8000 8001 8002
ENTRYPOINT ["/opt/tritonserver/bin/tritonserver"]
