# syntax=docker/dockerfile:1
# Triton for clusters without GPUs: the tritonserver binary of the PyPI wheel nvidia-pytriton (the models extra),
# exactly what `make up` and the tests run, with ONNX Runtime in the python backend. Built from the repository root:
#   docker build -f deploy/docker/triton-cpu.Dockerfile -t REGISTRY/samserve-triton:0.1.0-cpu .
ARG PYTHON_VERSION=3.12
# pyproject's [project] version (a test checks): names the wheel.
ARG SAMSERVE_VERSION=0.1.0

FROM python:${PYTHON_VERSION}-slim-bookworm AS wheel
ARG SAMSERVE_VERSION
ENV PIP_NO_CACHE_DIR=1 PIP_NO_INPUT=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY protos protos
COPY service service
COPY build build
COPY model_repository model_repository
RUN python -m pip install --disable-pip-version-check -q "setuptools>=69" "wheel" "grpcio-tools>=1.75,<1.81" "googleapis-common-protos>=1.63"
RUN python -m pip wheel --no-deps --no-build-isolation --disable-pip-version-check -q -w /dist /src
RUN python -m venv /opt/samserve
RUN /opt/samserve/bin/python -m pip install --disable-pip-version-check -q "/dist/samserve-${SAMSERVE_VERSION}-py3-none-any.whl[models]"
# The --backend-directory (backends/python/: the backend library and this Python's stub) and bin/tritonserver: links
# into the venv, at paths that name no Python version.
RUN /opt/samserve/bin/python -c "from samserve.launch.triton_server import prepare_server_dir; prepare_server_dir('/opt/triton')"

FROM python:${PYTHON_VERSION}-slim-bookworm
ARG PYTHON_VERSION
ENV PATH=/opt/samserve/bin:$PATH VIRTUAL_ENV=/opt/samserve PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    LD_LIBRARY_PATH=/opt/samserve/lib/python${PYTHON_VERSION}/site-packages/nvidia_pytriton.libs:/usr/local/lib
COPY --from=wheel /opt/samserve /opt/samserve
COPY --from=wheel /opt/triton /opt/triton
USER 65532:65532
EXPOSE 8000 8001 8002
ENTRYPOINT ["/opt/triton/bin/tritonserver", "--backend-directory=/opt/triton/backends"]
