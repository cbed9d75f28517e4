# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint bench clean setup

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements.lock -e '.[dev,ray]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/avcloud demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q

test-all: $(STAMP)
	$(BIN)/pytest -q -m ''

lint: $(STAMP)
	$(BIN)/ruff check .

# Every benchmark, short runs; JSON lands in runs/bench/. `make bench QUICK=` runs the full versions.
QUICK ?= --quick
bench: $(STAMP)
	mkdir -p runs/bench
	for area in optimizer datasets models runtime replay policies fleet security; do \
		$(BIN)/python benchmarks/bench_$$area.py $(QUICK) --out runs/bench/$$area.json || exit 1; \
	done

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
