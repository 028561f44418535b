# halfstep: `make run` serves the embedded MNIST model, `make test` runs the suite.
# Both create .venv on first use; later runs reinstall only when pyproject.toml changed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.halfstep-installed
HOST ?= 127.0.0.1
PORT ?= 8000
BUNDLE ?=
BACKEND ?= auto
PYTEST_ARGS ?=
# The CPU build of torch that ships on this project's machines; a GPU machine gets CUDA torch
# from the plain `torch>=2.4` dependency instead.
CPU_TORCH ?= torch==2.13.0

.PHONY: install run test lint browser clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q "$(CPU_TORCH)"; fi
	$(PY) -m pip install -q -e ".[serve,onnx,eval,dev]"
	touch $(STAMP)

run: install
	$(VENV)/bin/halfstep serve --host $(HOST) --port $(PORT) --backend $(BACKEND) $(if $(BUNDLE),--bundle $(BUNDLE))

# Headless Chromium for the playground test (skipped with a reason when it cannot be installed).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	  || echo "chromium not installed: the playground browser test will be skipped"; }

test: install browser
	HALFSTEP_MNIST_DIR=$${HALFSTEP_MNIST_DIR:-$(abspath ../shared/data/mnist)} $(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
