# charlm: the two commands a new user needs are `make train` and `make test`.
# Each sets up its own virtual environment. TORCH_SPEC pins torch: the default
# takes the CPU build that these machines keep on disk; elsewhere choose your
# own, e.g. `make test TORCH_SPEC='torch>=2.6'`.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
CHARLM := $(BIN)/charlm
CORPUS := data/shakespeare.txt
STAMP := $(shell date +%Y%m%d-%H%M%S)
RUN ?= runs/shakespeare-$(STAMP)
TRAIN_SECONDS ?= 180
BENCH_ARGS ?=

.PHONY: all venv data train test bench clean

all: test

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

data: $(CORPUS)

$(CORPUS): scripts/build_shakespeare.py | $(BIN)/.installed
	$(BIN)/python scripts/build_shakespeare.py --out $@

train: $(BIN)/.installed $(CORPUS)
	$(CHARLM) train --config configs/char_shakespeare.yaml --corpus $(CORPUS) \
		--out $(RUN) --max-time $(TRAIN_SECONDS)
	$(CHARLM) sample $(RUN) --num-samples 8 --max-length 300 --temperature 0.8 --seed 1
	$(CHARLM) score $(RUN) "To be, or not to be, that is the question." \
		"question the is that be, to not or be, To"

test: $(BIN)/.installed
	$(BIN)/python -m pytest

# The standard benchmark set (docs/benchmarks.md), e.g. `make bench BENCH_ARGS='--threads 1'`.
bench: $(BIN)/.installed
	$(BIN)/python scripts/bench_standard.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs
