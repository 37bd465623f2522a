# samserve: the two commands are `make up` (run the stack) and `make test` (run every test).
# Both set up what they need on a fresh machine first: Debian packages (when root), the virtual environment,
# the Python packages, and the export of the default model.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.samserve-installed
# Debian packages the stack needs at run time: Redis is the embedding cache's tier 2 (and the tests' Redis).
DEBIAN_PACKAGES ?= redis-server
PYTEST_ARGS ?=

.PHONY: up test setup system-deps stubs prepare bench clean

up: setup prepare
	$(BIN)/samserve up

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

setup: system-deps $(STAMP) stubs

# The gRPC API stubs: generated from protos/ by grpcio-tools, never committed.
stubs: $(STAMP)
	$(BIN)/python -c "import samserve.api"

system-deps:
	@if [ -n "$(strip $(DEBIAN_PACKAGES))" ] && [ "$$(id -u)" = 0 ]; then \
	  missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi; \
	fi

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python >= 3.11 required"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip wheel
	# torch/torchvision pinned to the releases on this machine's disk (CPU-only use; see README).
	$(BIN)/python -m pip install --quiet -e '.[models,export,bench,dev]'
	touch $(STAMP)

prepare: setup
	$(BIN)/samserve-build prepare

bench: setup
	$(BIN)/python bench/backends_cpu.py
	$(BIN)/python bench/models_cpu.py
	$(BIN)/python bench/gateway_cpu.py

clean:
	rm -rf .samserve
