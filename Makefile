# The two commands a new machine needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test venv clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

## Start the embedded stack (broker, redis, worker, mock model, shim) in the foreground.
run: $(STAMP)
	$(BIN)/quotameter up

## Unit and integration tests against real services started by the fixtures.
test: $(STAMP)
	$(BIN)/pytest


clean:
	rm -rf $(VENV) var test-artifacts .pytest_cache
