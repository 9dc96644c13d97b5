# Two commands do all set-up: `make run` (the main job on the embedded data) and `make test`.
# Installs take the exact versions of constraints.txt; pyproject.toml holds the ranges the code needs.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_ARGS ?=

.PHONY: run test test-fast lint prune clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# The product's main job: the pruning-schedule search on the embedded digits, a few minutes on
# a laptop; results in runs/search/demo/ (frontier.parquet, frontier.png, frontier/*.pt).
run: $(STAMP)
	$(BIN)/python search/run.py --name demo --target-flops 0.5 --final-epochs 3 --final-top 3 --distill $(RUN_ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q

# The inner loop: everything but the tests marked slow (Ray clusters, whole searches).
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q -m "not slow"

# One model, one schedule, no search.
prune: $(STAMP)
	$(BIN)/python -m ccpcsa prune --model resnet20 --dataset digits --out runs/prune --overwrite $(RUN_ARGS)

clean:
	rm -rf runs .pytest_cache
