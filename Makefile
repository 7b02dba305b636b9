# The targets README.md names. `make serve` and `make test` each set up .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# glibc would return torch's large buffers to the OS after each forward pass (halves CPU speed).
export MALLOC_MMAP_MAX_ := 0
export MALLOC_TRIM_THRESHOLD_ := 68719476736

.PHONY: install serve test test-fast lint typecheck bench smoke clean

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
	$(MAKE) --no-print-directory typecheck
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .

# mypy on app/, worker/ and all of model/ under their installed names (fprotoseg.*):
# build/typecheck/fprotoseg/{app,worker,model} link to the folders (see [tool.mypy] in pyproject.toml).
TYPECHECK_ROOT := build/typecheck/fprotoseg
typecheck: install
	@mkdir -p $(TYPECHECK_ROOT)
	@for d in app worker model; do ln -sfn ../../../$$d $(TYPECHECK_ROOT)/$$d; done
	$(BIN)/mypy -p fprotoseg.app -p fprotoseg.worker -p fprotoseg.model

bench: install
	$(BIN)/python bench/pipeline.py

# The docker compose deployment built and run for real with a CPU worker (docs/deploy.md, "Smoke
# test"). Needs a Docker daemon and takes minutes, so it is not part of `make test`.
smoke:
	docker/smoke.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
