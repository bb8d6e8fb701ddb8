# Entry points of the project. `make demo` runs the main job, `make test` the whole test suite.
SHELL := /bin/bash
.DEFAULT_GOAL := help
STACK := scripts/stack.sh
# Connection settings of the local stack, when it has been brought up.
WITH_ENV := if [ -f .stack/env ]; then source .stack/env; fi;

.PHONY: help up down status tools test lint migrate topics demo demo-stop

help:
	@echo "make demo    the main job: stack, services, a feed of ticks, the resulting bars"
	@echo "make demo-stop   stop the demo's services and the stack"
	@echo "make test    the whole test suite (installs tools, brings the stack up)"
	@echo "make up | down | status   the local stack (Kafka, PostgreSQL, Redis, chDB)"
	@echo "make migrate | topics     apply migrations / create topics on the running stack"
	@echo "make lint    ruff + mypy"

up:
	@bash $(STACK) up

down:
	@bash $(STACK) down

status:
	@bash $(STACK) status

# The tools the deployment checks need (promtool, helm), installed when missing.
tools:
	@bash scripts/install-tools.sh

# The whole suite against the real stack; installs the tools, brings the stack up and creates the
# contract's topics first (all idempotent), as a deployment's topic job would.
# pytest exits 5 when it collects no test at all; that is not a failure of the suite.
test: tools up topics
	@$(WITH_ENV) uv run --frozen pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

lint:
	uv run --frozen ruff check .
	uv run --frozen mypy shared/src scripts/src service-*/src

migrate:
	@$(WITH_ENV) uv run --frozen python -m dptools.migrate all

topics:
	@$(WITH_ENV) uv run --frozen python -m dptools.topics create

# The main job: stack, migrations, topics, reference data, the four services, a feed, the result.
demo: up
	@$(WITH_ENV) uv run --frozen python -m dptools.demo

# Stop the services started by the demo, then the stack.
demo-stop:
	@$(WITH_ENV) uv run --frozen python -m dptools.pipeline stop
	@bash $(STACK) down
