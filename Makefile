# The targets README.md names. `make serve` and `make test` each set up .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# glibc would return torch's large buffers to the OS after each forward pass (halves CPU speed).
export MALLOC_MMAP_MAX_ := 0
export MALLOC_TRIM_THRESHOLD_ := 68719476736

.PHONY: install serve test test-fast lint bench clean

$(BIN)/fprotoseg: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first: a looser requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0 $(if $(wildcard requirements/constraints.txt),-c requirements/constraints.txt)
	$(BIN)/pip install -q -e ".[train,dev]" $(if $(wildcard requirements/constraints.txt),-c requirements/constraints.txt)
	touch $@

install: $(BIN)/fprotoseg

serve: install
	$(BIN)/fprotoseg serve

test: install
	$(BIN)/ruff check .
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python bench/pipeline.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
