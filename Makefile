# mailgw — `make run` starts a working gateway, `make test` runs the test suite.
# Both install what is missing first: PostgreSQL's server binaries (apt-get) and
# a .venv with mailgw and its dependencies.

PYTHON ?= python3
VENV := .venv
CONFIG ?= etc/mailgw.toml
TRIAL_ARGS ?=
# twistd finds twisted/plugins/mailgw_plugin.py on this path.
export PYTHONPATH := $(CURDIR)

.PHONY: run test lint postgres venv clean bench-smtp bench-delivery bench-http fuzz-http bench-tracking \
	bench-webhooks

run: venv postgres
	$(VENV)/bin/mailgw --config $(CONFIG) init --demo
	exec $(VENV)/bin/twistd -n --pidfile= mailgw --config $(CONFIG)

test: venv postgres
	$(VENV)/bin/trial $(TRIAL_ARGS) tests

lint: venv
	$(VENV)/bin/ruff check mailgw tests twisted bench

# SMTP ingest benchmark against a private Postfix (installed when missing); see bench/README.md.
bench-smtp: venv postgres
	$(VENV)/bin/python bench/smtp_ingest.py

# Delivery benchmark: mailgw (MX via a local DNS) and a relaying Postfix into smtp-sink;
# see bench/README.md.
bench-delivery: venv postgres
	$(VENV)/bin/python bench/delivery.py

# HTTP send benchmark: POST /v1/email against mailgw's own SMTP ingest of the same
# message, in the same run; see bench/README.md.
bench-http: venv postgres
	$(VENV)/bin/python bench/http_send.py

# Schemathesis against a live Gateway: every operation of mailgw/http/openapi.json, a
# few thousand generated requests; fails if any is answered 500.
fuzz-http: venv postgres
	$(VENV)/bin/python -m tests.fuzz_http --max-examples 20

# Tracking benchmark: pixel and redirect hits per second, every event committed, against a
# bare twisted.web tracker with one INSERT per hit; see bench/README.md.
bench-tracking: venv postgres
	$(VENV)/bin/python bench/tracking.py

# Webhook benchmark: signed posts per second from mailgw's PostgreSQL queue to a local
# receiver, against a bare treq client posting the same bodies; see bench/README.md.
bench-webhooks: venv postgres
	$(VENV)/bin/python bench/webhooks.py

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.cfg
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || $(call apt_install,python3-venv)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

# PostgreSQL's server binaries (initdb, postgres, pg_ctl); no server is started here.
postgres:
	@ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || command -v postgres >/dev/null \
	  || $(call apt_install,postgresql)

clean:
	rm -rf $(VENV) _trial_temp *.egg-info

define apt_install
{ echo "installing $(1) with apt-get"; \
  [ "$$(id -u)" = 0 ] || { echo "need root to install $(1): sudo apt-get install -y $(1)"; exit 1; }; \
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(1) >/dev/null; }
endef
