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

# Without BUNDLE, `make run` serves a copy of the embedded model with ONNX exports, made once
# under .halfstep/ (~45 s): ONNX Runtime is 3-5x faster than eager torch at batch 1 on CPU, and
# the exports do not fit the embedded bundle's 30 MB package-data budget.
SERVED := .halfstep/mnist-onnx

$(SERVED)/bundle.json: $(RUN_STAMP) server/bundles/mnist/bundle.json
	rm -rf $(SERVED) $(SERVED).tmp
	$(VENV)/bin/halfstep copy-bundle server/bundles/mnist $(SERVED).tmp
	$(VENV)/bin/halfstep export --bundle $(SERVED).tmp --format onnx
	mv $(SERVED).tmp $(SERVED)

run: install $(if $(BUNDLE),,$(SERVED)/bundle.json)
	$(VENV)/bin/halfstep serve --host $(HOST) --port $(PORT) --backend $(BACKEND) --bundle $(if $(BUNDLE),$(BUNDLE),$(SERVED))

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
