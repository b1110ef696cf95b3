# Two commands for a fresh machine (see README):
#   make reproduce   set up, then run `mogvae reproduce` on its defaults
#   make test        set up, then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= reproduce-out

.PHONY: setup setup-bench reproduce test docs bench bench-quick clean

$(BIN)/mogvae: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/mogvae

# The benchmarks compare against pythae and JAX too: the `bench` extra.
$(VENV)/.bench-installed: $(BIN)/mogvae
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $@

setup-bench: $(VENV)/.bench-installed

reproduce: setup
	$(BIN)/mogvae reproduce --out $(OUT) --overwrite

test: setup
	$(BIN)/python -m pytest -q

# The docs site (docs/, mkdocs.yml) into site/; `$(BIN)/mkdocs serve` previews it while you edit.
docs: setup
	$(BIN)/mkdocs build --strict -d site

bench: setup-bench
	$(BIN)/python benchmarks/engines.py
	$(BIN)/python benchmarks/train_throughput.py

bench-quick: setup-bench
	$(BIN)/python benchmarks/engines.py --quick
	$(BIN)/python benchmarks/train_throughput.py --quick

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
