# The two commands a new user runs: `make demo` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# nox finds the other interpreters of the support matrix under pyenv.
PYENV_ROOT ?= $(shell pyenv root 2>/dev/null || echo $(HOME)/.pyenv)
empty :=
space := $(empty) $(empty)
export PATH := $(PATH):$(subst $(space),:,$(wildcard $(PYENV_ROOT)/versions/3.*/bin))

.PHONY: demo test test-fast check matrix examples dist bench clean

$(BIN)/.installed: setup.cfg pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e . -r requirements-dev.txt
	touch $@

## demo: send events through a real Optimizely client to the embedded fake ODP server
demo: $(BIN)/.installed
	$(BIN)/python examples/01_quickstart.py

## test: lint, types, the test suite on every supported SDK line and Python, examples, wheel smoke test
test: $(BIN)/.installed
	$(BIN)/python tools/run_matrix.py

## test-fast: the test suite on this venv's SDK (5.7.0) only
test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -q

## check: ruff and mypy --strict
check: $(BIN)/.installed
	$(BIN)/python -m ruff check .
	$(BIN)/python -m mypy

## bench: the side-by-side benchmark against the SDK's own send_odp_event (not part of `make test`)
bench: $(BIN)/.installed
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) .nox build dist *.egg-info
