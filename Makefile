# make demo: create .venv, install formerkit, train the default recipe (cct-digits, about a minute on a laptop CPU).
# make test: install formerkit with its [dev] extra, lint, run the whole suite.
# make test-fast: the same without the tests marked slow (training runs, subprocesses, export): under a minute.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A bare torch requirement would pull a multi-GB CUDA build on a machine without torch; install the CPU build first.
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test test-fast lint install install-dev bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.torch: | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_PIN)"
	touch $@

install: $(VENV)/.torch
	$(PY) -m pip install --quiet -e ".[train]"

install-dev: $(VENV)/.torch
	$(PY) -m pip install --quiet -e ".[dev]"

# The demo's run directory is its own: it is replaced on every `make demo`.
DEMO_RUN ?= runs/demo-cct-digits

demo: install
	rm -rf $(DEMO_RUN)
	$(VENV)/bin/formerkit train cct-digits --out $(DEMO_RUN)
	$(VENV)/bin/formerkit eval $(DEMO_RUN)

lint: install-dev
	$(PY) -m ruff check formerkit tests examples

test: install-dev lint
	$(PY) -m pytest -q

test-fast: install-dev lint
	$(PY) -m pytest -q -m "not slow"

# make bench: formerkit against its peers on this machine (about 10 minutes); tables and JSON under bench/.
bench: $(VENV)/.torch
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) -m pip install --quiet --no-deps vit-pytorch
	$(VENV)/bin/formerkit bench lm --markdown bench/lm.md --json bench/lm.json
	$(VENV)/bin/formerkit bench vision --markdown bench/vision.md --json bench/vision.json
	$(VENV)/bin/formerkit bench lora --markdown bench/lora.md --json bench/lora.json
	$(VENV)/bin/formerkit bench dit --markdown bench/dit.md --json bench/dit.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
