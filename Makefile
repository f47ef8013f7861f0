# Everything a user runs: set-up, the demo, the tests. `make help` lists the targets.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# the venv is rebuilt when pyproject.toml changes
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
OUT ?= output/demo
NOTEBOOKS := $(sort $(wildcard notebooks/0*.py))

.PHONY: help venv demo test lint notebooks clean

help:  ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | column -t -s $$'\t'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: this is the CPU build; an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[train,demo,notebooks,dev]'
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)  ## create or refresh the local virtual environment

notebooks: $(STAMP)  ## build build/notebooks/*.ipynb from the jupytext sources in notebooks/
	mkdir -p build/notebooks
	for nb in $(NOTEBOOKS); do \
	  $(BIN)/jupytext --quiet --to ipynb --output build/notebooks/$$(basename $${nb%.py}).ipynb $$nb; \
	done

demo: notebooks  ## run the four notebooks on the synthetic demo data; outputs in $(OUT)
	rm -rf demo/work $(OUT)
	mkdir -p $(OUT)
	$(BIN)/python -m kaggle_utils.demo_data --out-dir demo/data
	$(BIN)/python -m kaggle_utils.demo_models --out-dir demo/models
	for nb in $(NOTEBOOKS); do \
	  name=$$(basename $${nb%.py}); \
	  $(BIN)/papermill --cwd . --progress-bar --log-level WARNING build/notebooks/$$name.ipynb $(OUT)/$$name.ipynb; \
	done
	cp demo/work/submission/submission.csv $(OUT)/submission.csv
	$(BIN)/python -c "import json; r = json.load(open('demo/work/submission/report.json')); \
	  print(f\"submission: $(OUT)/submission.csv ({r['rows']} rows)\"); \
	  print(f\"held-out demo accuracy: {r['accuracy']['accuracy']:.3f} on {r['accuracy']['rows']} test rows\")"

lint: $(STAMP)  ## ruff on the package, tests and notebook sources
	$(BIN)/ruff check kaggle_utils tests
	$(BIN)/ruff format --check kaggle_utils tests

test: lint  ## lint, then the test suite
	$(BIN)/python -m pytest

clean:  ## remove generated files (keeps the venv)
	rm -rf build demo output
