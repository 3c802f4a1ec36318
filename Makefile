# Warden: `make run` starts the proxy with the example rules, `make test` runs the suite.
# Both bootstrap .venv from nothing. Override the interpreter with PYTHON=/path/to/python3.12.
#
#   make run RULES=/etc/warden/rules AUDIT_LOG=/var/log/warden/audit.jsonl CONFDIR=/etc/warden/ca \
#            LISTEN=0.0.0.0:8080 UPSTREAM_CA=/etc/ssl/internal-ca.pem WARDEN_ARGS='--workers 2 -v'
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LISTEN ?= 127.0.0.1:8080
METRICS_LISTEN ?= 127.0.0.1:9464
RULES ?= rules
AUDIT_LOG ?= -
CONFDIR ?= certs
# An internal CA: Warden verifies upstreams against it (ssl_verify_upstream_trusted_ca) and
# the agents' trust bundle includes it (passed-through internal hosts show its certificates).
UPSTREAM_CA ?=
# Any further `warden run` flags, passed through unchanged.
WARDEN_ARGS ?=
START_TIMEOUT ?= 60
BUNDLE = $(CONFDIR)/agent/warden-ca-bundle.pem
# Where agents on this host reach Warden (a wildcard listen address is not one to connect to).
AGENT_PROXY = $(subst 0.0.0.0:,127.0.0.1:,$(LISTEN))
PYTEST_ARGS ?=

.PHONY: run test lint check bench bench-quick bench-engine clean system-deps js-test-deps

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || { py=$$(.ci/find-python) && echo "using $$py" && "$$py" -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

# The banner comes only after Warden's own start-up line ("warden ... listening on"), which
# it prints once the port is bound: the recipe runs warden in the background, watches its
# stderr for that line (bounded by START_TIMEOUT seconds), then prints and waits.
run: $(STAMP)
	@test -f '$(CONFDIR)/mitmproxy-ca.pem' || $(BIN)/warden ca init --confdir '$(CONFDIR)'
	@$(BIN)/warden ca bundle --confdir '$(CONFDIR)' --out '$(BUNDLE)' $(if $(UPSTREAM_CA),--extra-ca '$(UPSTREAM_CA)') >/dev/null
	@log=$$(mktemp); trap 'rm -f "$$log"' EXIT; \
	$(BIN)/warden run --rules '$(RULES)' --listen '$(LISTEN)' --metrics-listen '$(METRICS_LISTEN)' \
	  --audit-log '$(AUDIT_LOG)' --confdir '$(CONFDIR)' \
	  $(if $(UPSTREAM_CA),--set 'ssl_verify_upstream_trusted_ca=$(abspath $(UPSTREAM_CA))') $(WARDEN_ARGS) \
	  2> >(tee "$$log" >&2) & pid=$$!; \
	trap 'kill -TERM $$pid 2>/dev/null; wait $$pid; exit 130' INT TERM; \
	for i in $$(seq 1 $$(( $(START_TIMEOUT) * 10 ))); do \
	  grep -q '^warden .* listening on ' "$$log" && break; \
	  kill -0 $$pid 2>/dev/null || { wait $$pid; rc=$$?; echo "make run: warden exited with status $$rc before listening" >&2; exit $$rc; }; \
	  sleep 0.1; \
	done; \
	grep -q '^warden .* listening on ' "$$log" || { echo "make run: warden not listening after $(START_TIMEOUT) s; stopping it" >&2; kill -TERM $$pid; wait $$pid; exit 1; }; \
	echo "Warden is listening on $(LISTEN); metrics on http://$(METRICS_LISTEN)/metrics; rules $(RULES); audit $(if $(filter -,$(AUDIT_LOG)),stdout,$(AUDIT_LOG))"; \
	echo "Agent shell (the example rules accept agent coder, token example-coder-token; your own: $(BIN)/warden token ID):"; \
	echo "  eval \"\$$($(abspath $(BIN))/warden agent-env --agent coder --token example-coder-token --proxy $(AGENT_PROXY) --ca-bundle $(abspath $(BUNDLE)))\""; \
	wait $$pid

# Debian packages some tests drive (promtool for the alert rules, bubblewrap for `warden sandbox`,
# nginx/squid only for bench).
# Best effort: without root or apt the dependent tests skip and say why.
system-deps:
	@missing=""; command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	command -v unshare >/dev/null || missing="$$missing util-linux"; \
	command -v git >/dev/null || missing="$$missing git"; command -v curl >/dev/null || missing="$$missing curl"; \
	command -v node >/dev/null || missing="$$missing nodejs"; command -v npm >/dev/null || missing="$$missing npm"; \
	command -v docker-compose >/dev/null || missing="$$missing docker-compose"; \
	command -v bwrap >/dev/null || missing="$$missing bubblewrap"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing:$$missing"; (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing) >/dev/null 2>&1 || echo "apt-get failed; dependent tests will skip"; fi

# The TypeScript MCP SDK for tests/test_mcp_stdio_js.py (pinned in tests/js/package-lock.json).
js-test-deps: system-deps
	cd tests/js && npm ci --no-audit --no-fund --silent

test: $(STAMP) system-deps
	$(BIN)/ruff check addons tests bench
	$(BIN)/mypy
	$(BIN)/warden test rules policy-tests/
	@# Bytecode for the hundreds of `warden` processes the suite starts, as `pip install` writes
	@# it for an installed package; with PYTHONDONTWRITEBYTECODE=1 each would recompile ~90 modules.
	$(BIN)/python -m compileall -q addons/egresswarden
	$(BIN)/python -m pytest -q -rs $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check addons tests bench
	$(BIN)/mypy

check: $(STAMP)
	$(BIN)/warden check $(RULES)

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
