# halfstep: `make run` serves the embedded MNIST model, `make test` runs the suite.
# Both create .venv on first use; later runs reinstall only when pyproject.toml changed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# `make run` installs what serving needs; `make test` and `make lint` add the eval and dev
# extras. One stamp per set: each reinstalls only when pyproject.toml changed.
RUN_EXTRAS ?= serve,onnx
DEV_EXTRAS ?= serve,onnx,eval,dev
RUN_STAMP := $(VENV)/.halfstep-installed-run
DEV_STAMP := $(VENV)/.halfstep-installed-dev
HOST ?= 127.0.0.1
PORT ?= 8000
BUNDLE ?=
BACKEND ?= auto
PYTEST_ARGS ?=
# The MNIST IDX files for the tests: $HALFSTEP_MNIST_DIR, else a data/mnist folder beside this
# checkout; the tests that need them skip with a reason when neither exists.
MNIST_DIR ?= $(or $(HALFSTEP_MNIST_DIR),$(firstword $(wildcard $(abspath ..)/*/data/mnist)))
# Installed first where no NVIDIA driver is present, so that the plain `torch>=2.4` dependency
# does not pull a multi-GB CUDA build; a GPU machine gets CUDA torch from that dependency.
CPU_TORCH ?= torch==2.13.0

.PHONY: install run test lint browser clean

install: $(RUN_STAMP)

# install_extras EXTRAS: the venv, CPU torch where no NVIDIA driver is present, then the
# package in editable mode with EXTRAS.
define install_extras
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q "$(CPU_TORCH)"; fi
	$(PY) -m pip install -q -e ".[$(1)]"
endef

$(RUN_STAMP): pyproject.toml
	$(call install_extras,$(RUN_EXTRAS))
	touch $(RUN_STAMP)

# The dev set holds the run set, so it satisfies both stamps.
$(DEV_STAMP): pyproject.toml
	$(call install_extras,$(DEV_EXTRAS))
	touch $(DEV_STAMP) $(RUN_STAMP)

# Without BUNDLE, `make run` serves the embedded model. On CPU, `halfstep serve --backend auto`
# exports it to ONNX once (~1 minute) into $HALFSTEP_CACHE (default ~/.cache/halfstep) and
# serves that copy: ONNX Runtime is 3-5x faster than eager torch at batch 1 on CPU.
run: install
	$(VENV)/bin/halfstep serve --host $(HOST) --port $(PORT) --backend $(BACKEND) $(if $(BUNDLE),--bundle $(BUNDLE),)

# Headless Chromium for the playground test (skipped with a reason when it cannot be installed).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	  || echo "chromium not installed: the playground browser test will be skipped"; }

test: $(DEV_STAMP) browser
	HALFSTEP_MNIST_DIR=$(MNIST_DIR) $(PY) -m pytest $(PYTEST_ARGS)

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info .halfstep
