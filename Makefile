# Developer entry points. `make run` and `make test` are the README's two set-up commands.
SHELL := /bin/bash
.DEFAULT_GOAL := help
BOOTSTRAP := source scripts/bootstrap.sh

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

run:  ## start the control plane on SQLite (web + qcluster), migrations applied under the lock
	@scripts/run

demo:  ## make run + two echo workers and a model demo-echo kept at 2 replicas (Ctrl-C stops all)
	@scripts/demo

test:  ## the whole suite on SQLite and on PostgreSQL
	@scripts/test

soak:  ## the soak: a fleet under traffic with random kills and restarts (DURATION=seconds, default 60)
	@scripts/soak $(or $(DURATION),60)

bench:  ## quick versions of the four hot-path benchmarks on PostgreSQL, each ratio against its goal (< 5 min)
	@scripts/bench

check:  ## lint, migration drift, generated-code drift, OpenAPI drift, Prometheus rules (promtool), nginx config and systemd units
	@$(BOOTSTRAP); ruff check .
	@$(BOOTSTRAP); CONTROLPLANE_VAR_DIR=$$(mktemp -d) python manage.py makemigrations --check --dry-run
	@$(BOOTSTRAP); python scripts/gen_proto.py --check
	@$(BOOTSTRAP); if [ -f scripts/check_openapi.py ]; then CONTROLPLANE_VAR_DIR=$$(mktemp -d) python scripts/check_openapi.py; fi
	@scripts/check_monitoring
	@scripts/check_deploy

proto:  ## regenerate the protobuf/gRPC code under proto/
	@$(BOOTSTRAP); python scripts/gen_proto.py

.PHONY: help run demo test soak bench check proto
