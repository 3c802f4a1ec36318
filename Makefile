# Warden: `make run` starts the proxy with the example rules, `make test` runs the suite.
# Both bootstrap .venv from nothing. Override the interpreter with PYTHON=/path/to/python3.12.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LISTEN ?= 127.0.0.1:8080
METRICS_LISTEN ?= 127.0.0.1:9464
PYTEST_ARGS ?=

.PHONY: run test lint check bench bench-quick bench-engine clean system-deps js-test-deps

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || { py=$$(.ci/find-python) && echo "using $$py" && "$$py" -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

run: $(STAMP)
	@test -f certs/mitmproxy-ca.pem || $(BIN)/warden ca init --confdir certs
	@echo "Warden listening on $(LISTEN); metrics on http://$(METRICS_LISTEN)/metrics"
	@echo "Agent settings (replace the token with one from 'warden token <agent-id>'):"
	@echo "  export HTTPS_PROXY=http://<agent-id>:<token>@$(LISTEN) HTTP_PROXY=http://<agent-id>:<token>@$(LISTEN)"
	@echo "  CA for intercepted hosts: $(CURDIR)/certs/mitmproxy-ca-cert.pem (trust bundle: $(BIN)/warden ca bundle --out certs/bundle.pem)"
	$(BIN)/warden run --rules rules --listen $(LISTEN) --metrics-listen $(METRICS_LISTEN) --audit-log - --confdir certs

# Debian packages some tests drive (promtool for the alert rules, nginx/squid only for bench).
# Best effort: without root or apt the dependent tests skip and say why.
system-deps:
	@missing=""; command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	command -v git >/dev/null || missing="$$missing git"; command -v curl >/dev/null || missing="$$missing curl"; \
	command -v node >/dev/null || missing="$$missing nodejs"; command -v npm >/dev/null || missing="$$missing npm"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing:$$missing"; (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing) >/dev/null 2>&1 || echo "apt-get failed; dependent tests will skip"; fi

# The TypeScript MCP SDK for tests/test_mcp_stdio_js.py (pinned in tests/js/package-lock.json).
js-test-deps: system-deps
	cd tests/js && npm ci --no-audit --no-fund --silent

test: $(STAMP) system-deps
	$(BIN)/ruff check addons tests bench
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check addons tests bench

check: $(STAMP)
	$(BIN)/warden check rules

# Benchmarks (by hand, never in CI): proxy comparison (~7 min), then bench/README.md for
# engine_bench.py, reload_bench.py, soak.py, bench_credentials.py and bench_mcp.py.
bench: $(STAMP)
	bench/run.sh

bench-quick: $(STAMP)
	bench/run.sh --quick

bench-engine: $(STAMP)
	$(BIN)/python bench/engine_bench.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
