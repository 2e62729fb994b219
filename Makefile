# hdrq-lightning: `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
EXPERIMENT ?= digits
PYTEST_ARGS ?=
JOBS_PER_GPU ?= 2
SWEEP ?= quant=brecq,qdrop,hdrq quant.w_bits=4,3 'quant.a_bits=$${quant.w_bits}'

.DEFAULT_GOAL := help

help: ## list the targets (coloured on a terminal only)
	@if [ -t 1 ]; then on='\033[36m'; off='\033[0m'; else on=''; off=''; fi; \
	grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | \
	  awk -v on="$$on" -v off="$$off" 'BEGIN {FS = ":.*?## "}; {printf "  %s%-10s%s %s\n", on, $$1, off, $$2}'

$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(PY) -c "import torch, torchvision, timm, segmentation_models_pytorch, lightning" \
	  || { echo "install check failed: torch/torchvision/timm/smp do not import together"; exit 1; }
	@touch $@

install: $(VENV)/.installed ## create .venv (if missing) and install the package with its dev extras

run: install ## run the whole pipeline on the built-in benchmark (EXPERIMENT=digits)
	WANDB_MODE=$${WANDB_MODE:-offline} $(VENV)/bin/hdrq pipeline experiment=$(EXPERIMENT)

pmq-ablation: install ## the pipeline plus E-PMQ's anchor sweep (pmq_anchor.png); finished stages are reused
	WANDB_MODE=$${WANDB_MODE:-offline} $(VENV)/bin/hdrq pipeline experiment=$(EXPERIMENT) \
	  'pipeline.pmq.anchor_sweep=[0,0.1,0.3,1,3,10,inf]'

sweep: install ## quantize sweep (SWEEP='<overrides>'), JOBS_PER_GPU=2 jobs per GPU at once; needs '.[sweep]'
	@gpus=$$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); \
	jobs=$$(( gpus > 0 ? gpus * $(JOBS_PER_GPU) : 1 )); \
	echo "sweep: $$gpus GPU(s), $$jobs jobs at a time"; \
	WANDB_MODE=$${WANDB_MODE:-offline} $(VENV)/bin/hdrq quantize -m experiment=$(EXPERIMENT) $(SWEEP) \
	  hydra/launcher=joblib hydra.launcher.n_jobs=$$jobs gpu_slots=$(JOBS_PER_GPU)

test: install ## fast test suite (skips tests marked slow)
	$(PY) -m pytest -m "not slow" -q $(PYTEST_ARGS)

test-full: install ## every test, slow ones included
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: install ## ruff lint
	$(VENV)/bin/ruff check hdrq_lightning tests bench

clean-runs: ## delete run directories of the built-in experiment
	rm -rf runs/$(EXPERIMENT)

.PHONY: help install run pmq-ablation test test-full lint clean-runs
