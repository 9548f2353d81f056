# make demo: create .venv, install formerkit, run the demo on data already on this machine.
# make test: install formerkit with its [dev] extra, lint, run the whole suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A bare torch requirement would pull a multi-GB CUDA build on a machine without torch; install the CPU build first.
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test lint install install-dev clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.torch: | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_PIN)"
	touch $@

install: $(VENV)/.torch
	$(PY) -m pip install --quiet -e .

install-dev: $(VENV)/.torch
	$(PY) -m pip install --quiet -e ".[dev]"

demo: install
	$(VENV)/bin/formerkit models
	$(VENV)/bin/formerkit summary char_gpt --batch 8
	$(PY) examples/quickstart.py

lint: install-dev
	$(PY) -m ruff check formerkit tests examples

test: install-dev lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
