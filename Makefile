# The two commands of the README:
#   make run    run sendguard on its embedded defaults (config/sendguard.yaml: maildir upstream)
#   make test   install everything the tests need, then lint, type-check and run the whole suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test lint typecheck pytest bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	@touch $@

# The system packages first: the test extra builds pymilter against libmilter-dev.
$(VENV)/.test: pyproject.toml | $(BIN)/python
	scripts/install-test-tools
	$(BIN)/pip install --quiet -e ".[test]"
	@touch $@

run: $(VENV)/.runtime
	$(BIN)/sendguard serve --config config/sendguard.yaml

test: $(VENV)/.test
	scripts/install-test-tools
	$(MAKE) --no-print-directory lint typecheck pytest

lint:
	$(BIN)/ruff check proxy policies tests bench
	$(BIN)/ruff format --check proxy policies tests bench

typecheck:
	$(BIN)/mypy

pytest:
	$(BIN)/pytest

bench: $(VENV)/.test
	scripts/install-test-tools
	$(BIN)/python bench/relay_throughput.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
