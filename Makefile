# Two commands do all the set-up (see README.md):
#   make demo   installs the runtime into .venv and runs the bundled demo model on a generated scene
#   make test   installs the export + dev extras (torch CPU build included) into .venv and runs the tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test lint-imports install-runtime install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[serve]"
	touch $@

# torch is installed first and pinned: an open requirement would pull a multi-GB CUDA build.
$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[export,serve,plots,dev]"
	touch $@

install-runtime: $(VENV)/.runtime
install-dev: $(VENV)/.dev

demo: $(VENV)/.runtime
	$(BIN)/edge-duet run --demo

test: $(VENV)/.dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The layering contracts of pyproject.toml ([tool.importlinter]); tests/test_layering.py runs them too.
lint-imports: $(VENV)/.dev
	$(BIN)/python scripts/lint_imports.py

clean:
	rm -rf $(VENV) .pytest_cache
