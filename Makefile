# The two README commands: `make demo` (set up, run the main job) and `make test`
# (set up, run the whole test suite). Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test services browser bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first, pinned: a requirement that admits a newer torch pulls several GB of CUDA
# packages; 2.13.0 is the CPU wheel on these machines. An existing torch is kept.
install: $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"

services:
	bash scripts/services.sh

browser:
	bash scripts/browser.sh

demo: install
	bash scripts/demo.sh

test: install services browser
	$(BIN)/python -m pytest

bench: install
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	$(BIN)/python bench/bench_merge.py
	$(BIN)/python bench/bench_export.py
	$(BIN)/python bench/world_effect.py
	$(BIN)/python bench/bench_search.py --png docs/img/search_best_so_far.png
	bash scripts/services.sh
	$(BIN)/python bench/bench_api.py

clean:
	rm -rf $(VENV) out demo .pytest_cache
