# The two commands of the README: `make demo` and `make test`.
PY ?= python3
VENV := .venv
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/postgres

.PHONY: demo test lint monitor bench clean-venv

$(VENV)/.installed: requirements.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

## demo: virtualenv, install, migrate the embedded SQLite default, replay real Binance prices through the monitor
demo: $(VENV)/.installed
	$(VENV)/bin/python manage.py migrate --noinput -v0
	$(VENV)/bin/python manage.py replay_demo

## monitor: one monitor pass, as the CronJob runs it (replay venue on the embedded default)
monitor: $(VENV)/.installed
	$(VENV)/bin/python manage.py migrate --noinput -v0
	$(VENV)/bin/python manage.py monitor_stops --json

## test: the whole suite against PostgreSQL (plus Redis and RabbitMQ on loopback)
test: $(VENV)/.installed
	DATABASE_URL=$(TEST_DATABASE_URL) $(VENV)/bin/pytest

## lint: ruff (pyflakes rules, complexity <= 12 and <= 50 statements per function) and the import-linter contracts of .importlinter (CI runs it before the tests)
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

## bench: the monitor-pass benchmark on PostgreSQL
bench: $(VENV)/.installed
	DATABASE_URL=$(TEST_DATABASE_URL) $(VENV)/bin/python bench/bench_pass.py

## bench-stream: quote-to-order latency of monitor_stops --stream vs --loop --interval 1 vs the CronJob
.PHONY: bench-stream
bench-stream: $(VENV)/.installed
	DATABASE_URL=$(TEST_DATABASE_URL) $(VENV)/bin/python bench/bench_stream.py

## bench-api: GET /api/v1/operations/ under gunicorn gevent workers (wrk if installed): latency, SQL per request
.PHONY: bench-api
bench-api: $(VENV)/.installed
	DATABASE_URL=$(TEST_DATABASE_URL) $(VENV)/bin/python bench/bench_api.py

## check-deploy: offline checks of what is deployed: actionlint, yamllint, kustomize of every overlay, strict schemas, Rego policy, Argo CD CRD schemas
.PHONY: check-deploy
$(VENV)/.installed-ci: $(VENV)/.installed requirements-ci.txt
	$(VENV)/bin/pip install --disable-pip-version-check -q -r requirements-ci.txt
	touch $@

check-deploy: $(VENV)/.installed-ci
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/actionlint
	$(VENV)/bin/yamllint --strict .github deploy .yamllint.yaml
	$(VENV)/bin/python deploy/scripts/check_deploy.py
