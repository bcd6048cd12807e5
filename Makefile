# hotswap: `make serve` runs a real Triton on CPU serving the examples; `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch is pinned; never an unpinned torch (on Linux that pulls GBs of CUDA wheels). For the CPU build,
# let pip find a CPU wheel of this version (PIP_FIND_LINKS or PIP_EXTRA_INDEX_URL).
TORCH_PIN ?= torch==2.13.0

HOTSWAP_WEIGHTS_ROOT ?= $(CURDIR)/weights
HOTSWAP_CACHE_DIR ?= $(HOME)/.cache/hotswap/engines
export HOTSWAP_WEIGHTS_ROOT HOTSWAP_CACHE_DIR

.PHONY: venv test unit integration lint typecheck serve bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[triton,test]" "$(TORCH_PIN)"
	# TensorRT stubs and Torch-TensorRT's typed Python sources for the strict check; --no-deps: both
	# depend on TensorRT's libraries, which come only from NVIDIA's own index
	$(PY) -m pip install -q --no-deps tensorrt-stubs==10.13.0.35.1 torch-tensorrt==2.13.0
	$(PY) tools/trt_stubs.py $(VENV)/trt-stubs
	touch $(STAMP)

lint: venv
	$(VENV)/bin/ruff check serving tests bench

typecheck: venv
	$(VENV)/bin/mypy serving
	$(VENV)/bin/mypy --config-file mypy-tensorrt.ini serving/engines/tensorrt serving/engines/export.py

serve: venv
	$(VENV)/bin/hotswap serve --model-repository model_repository

unit: venv
	$(PY) -m pytest -q tests/unit

# --durations: the slowest tests and fixtures, to keep the suite within its time budget (8 minutes on 2 cores)
test: venv lint typecheck
	$(PY) -m pytest -q -ra --durations=15 tests

integration: venv
	$(PY) -m pytest -q -ra tests/integration

bench: venv
	$(PY) bench/refit.py --json

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

include deploy/check.mk
