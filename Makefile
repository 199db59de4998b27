# The two commands a new machine needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test venv debian-deps clean

# Debian packages the integration tests drive for real: a headless browser for
# the built-in dashboard, nginx (and its njs module) for the check endpoint
# behind auth_request and the usage report.
# Installed once, only where missing (needs root).
DEBIAN_PACKAGES := chromium nginx-light libnginx-mod-http-js

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

debian-deps:
	@missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

## Start the embedded stack (broker, redis, worker, mock model, shim) in the foreground.
run: $(STAMP)
	$(BIN)/quotameter up

## Unit and integration tests against real services started by the fixtures.
test: $(STAMP) debian-deps
	$(BIN)/pytest

clean:
	rm -rf $(VENV) var test-artifacts .pytest_cache
