# syntax=docker/dockerfile:1
# The samserve gateway image (and, as further targets, the model-preparation and load-test images), built from the
# repository root:
#   docker build -f deploy/docker/gateway.Dockerfile -t REGISTRY/samserve-gateway:0.1.0 .
#   docker build -f deploy/docker/gateway.Dockerfile --target prepare -t REGISTRY/samserve-prepare:0.1.0 .
#   docker build -f deploy/docker/gateway.Dockerfile --target loadtest -t REGISTRY/samserve-loadtest:0.1.0 .
# Stage `wheel` builds the wheel (the build hook generates the gRPC stubs) and installs it into a venv; the final
# stages copy only that venv: no compiler, no build tools, no repository. Every RUN step is a command that
# tests/integration/test_wheel.py runs (tests/deploy/test_images.py checks the two agree).
ARG PYTHON_VERSION=3.12
ARG NODE_VERSION=20
# pyproject's [project] version (a test checks): names the wheel.
ARG SAMSERVE_VERSION=0.1.0

# The web page (web/: samclient.js and the page, bundled with onnxruntime-web by esbuild into
# service/samserve/web_static/): the two commands of `make web`, from the lock file.
FROM node:${NODE_VERSION}-bookworm-slim AS web
WORKDIR /src/web
COPY web/package.json web/package-lock.json ./
RUN npm ci --no-audit --no-fund --ignore-scripts
COPY web ./
RUN npm run --silent build

FROM python:${PYTHON_VERSION}-slim-bookworm AS wheel
ARG SAMSERVE_VERSION
ENV PIP_NO_CACHE_DIR=1 PIP_NO_INPUT=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY protos protos
COPY service service
COPY --from=web /src/service/samserve/web_static service/samserve/web_static
COPY build build
COPY model_repository model_repository
# pyproject's [build-system] requires (the wheel is built without build isolation, as the test builds it).
RUN python -m pip install --disable-pip-version-check -q "setuptools>=69" "wheel" "grpcio-tools>=1.75,<1.81" "googleapis-common-protos>=1.63"
RUN python -m pip wheel --no-deps --no-build-isolation --disable-pip-version-check -q -w /dist /src
RUN python -m venv /opt/samserve
RUN /opt/samserve/bin/python -m pip install --disable-pip-version-check -q /dist/samserve-${SAMSERVE_VERSION}-py3-none-any.whl

# `samserve-build prepare` (ONNX export + Triton repository): the export extra (PyTorch, the official
# segment-anything, ONNX) and the models extra (the CPU runtimes `auto` calibrates) on top of the wheel. Large (PyTorch
# as PyPI serves it, with CUDA libraries); used by the chart's prepare Job or init container only.
FROM wheel AS prepare-venv
# An ARG ends with the stage that declares it: this stage names the wheel too.
ARG SAMSERVE_VERSION
RUN /opt/samserve/bin/python -m pip install --disable-pip-version-check -q "/dist/samserve-${SAMSERVE_VERSION}-py3-none-any.whl[export,models]"

FROM python:${PYTHON_VERSION}-slim-bookworm AS prepare
ENV PATH=/opt/samserve/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 SAMSERVE_WORKDIR=/models
COPY --from=prepare-venv /opt/samserve /opt/samserve
USER 65532:65532
ENTRYPOINT ["/opt/samserve/bin/samserve-build", "prepare"]

# Locust workers and master (bench/locustfile.py comes from a ConfigMap): the bench extra's locust, and the project's
# dev package (tools/samserve_dev: the locustfile's seeded images).
FROM wheel AS loadtest-venv
COPY tools tools
RUN /opt/samserve/bin/python -m pip install --disable-pip-version-check -q "locust>=2.30"
RUN /opt/samserve/bin/python -m pip install --disable-pip-version-check -q ./tools

FROM python:${PYTHON_VERSION}-slim-bookworm AS loadtest
ENV PATH=/opt/samserve/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
COPY --from=loadtest-venv /opt/samserve /opt/samserve
USER 65532:65532
ENTRYPOINT ["/opt/samserve/bin/locust"]


# The gateway: the venv on the same slim base, a non-root user, exec-form entry point (no shell needed).
FROM python:${PYTHON_VERSION}-slim-bookworm AS gateway
ENV PATH=/opt/samserve/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    SAMSERVE_GATEWAY_HOST=0.0.0.0 SAMSERVE_EMBEDDING_TRANSPORT=grpc
COPY --from=wheel /opt/samserve /opt/samserve
USER 65532:65532
# gRPC API (grpc.health.v1 too), HTTP/JSON, Prometheus metrics.
EXPOSE 50051 8080 9464
ENTRYPOINT ["/opt/samserve/bin/samserve", "gateway"]
