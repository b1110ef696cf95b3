# Two commands for a fresh machine (see README):
#   make reproduce   set up, then run `mogvae reproduce` on its defaults
#   make test        set up, then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= reproduce-out

.PHONY: setup reproduce test bench bench-quick clean

$(BIN)/mogvae: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/mogvae

reproduce: setup
	$(BIN)/mogvae reproduce --out $(OUT) --overwrite

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/train_throughput.py

bench-quick: setup
	$(BIN)/python benchmarks/train_throughput.py --quick

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
