# Set-up and everyday commands. `make demo` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned so pip takes the CPU build (a local wheel on our machines) instead of a multi-GB CUDA
# build; override on GPU hosts, e.g. TORCH_SPEC='torch>=2.4'.
TORCH_SPEC ?= torch==2.13.0
SAMPLE := qscore/data/sample_queries.jsonl
OUT := out

.PHONY: setup demo test lint bench-cpu bench-fleet clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet '$(TORCH_SPEC)'
	$(BIN)/pip install --quiet -e '.[build,test]'
	touch $@

demo: setup
	mkdir -p $(OUT)
	$(BIN)/qscore rescore $(SAMPLE) -o $(OUT)/sample_scores.jsonl
	@echo "--- first scores ($(OUT)/sample_scores.jsonl) ---"
	@head -n 5 $(OUT)/sample_scores.jsonl | cut -c 1-200

test: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports

bench-cpu: setup
	$(BIN)/python bench/engine_cpu.py

bench-fleet: setup
	$(BIN)/python bench/batching.py
	$(BIN)/python bench/cache.py

clean:
	rm -rf $(OUT) .pytest_cache .ruff_cache
