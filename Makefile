# Two entry points: `make demo` (the whole path, raw bytes to verified weights) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint demo clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU build of torch first, so no dependency pulls a CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# One worker per CPU (at most 4), a test file per worker, one BLAS thread each: most tests are small ops that a
# second thread barely speeds up, and the multi-process ones start their ranks with one thread anyway.
PARALLEL := -n logical --maxprocesses 4 --dist loadfile

test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q $(PARALLEL)

test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q $(PARALLEL) -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check sourcelm tests bench

demo: $(STAMP)
	$(BIN)/python -m sourcelm.demo

clean:
	rm -rf $(VENV) build *.egg-info
