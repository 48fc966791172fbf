# dynarch — two set-up commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: demo test lint typecheck unit bench install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/dynarch run src/dynarch/configs/demo.yaml

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest

test: lint typecheck unit

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e ".[bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python bench/core.py
	$(BIN)/python bench/dst_speed.py --repeats 15 --block 10 --threads 1
	$(BIN)/python bench/dst.py --jobs 2 --epochs 20 --normalize --methods dense,static,set,deep_r,rigl,snfs,rigl_uniform,gmp,rigl-torch
	$(BIN)/python bench/grow_vs_static.py --jobs 2 --select-seeds 1 --schedules 0.1:zero,0.25:zero,0.5:zero,0.25:net2net,0.5:net2net,1:net2net
	$(BIN)/python bench/grow_vs_static.py --methods static,grown --schedules 0.01:zero,0.1:zero --shrink 0.5 --seeds 10 --select-seeds 1 --jobs 2 --out bench/results/grow_vs_static_shrink_10seeds.json
	$(BIN)/dynarch rescue src/dynarch/configs/fashion-rescue.yaml --seeds 3 --jobs 2 --out bench/results/rescue.json

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
