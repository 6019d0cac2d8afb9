# One Makefile drives both CI and people. Every target bootstraps what it needs.
SHELL := /bin/bash
PYTHON ?= python3
UV_VERSION := 0.13.8
TOOLS := .tools
UV := $(shell command -v uv 2>/dev/null || echo $(TOOLS)/bin/uv)
VENV := .venv
BIN := $(VENV)/bin
export UV_PROJECT_ENVIRONMENT := $(VENV)
# Bytecode compiled at install, as the image has it (this machine sets
# PYTHONDONTWRITEBYTECODE, so nothing would ever be cached otherwise).
export UV_COMPILE_BYTECODE := 1
COMPILE = $(BIN)/python -m compileall -q -j 0

.PHONY: install test lint proto demo bench clean

$(TOOLS)/bin/uv:
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# Everything: the test suite needs every extra, and dynalite (node) beside moto.
$(BIN)/.installed: pyproject.toml uv.lock package.json package-lock.json | $(UV)
	$(UV) sync --frozen --all-extras --python $(PYTHON)
	npm ci --no-audit --no-fund --silent
	$(COMPILE) worker lambda_entry.py
	touch $@

# The demo needs only moto and deltalake: no node, no benchmark libraries.
$(BIN)/.installed-demo: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --inexact --extra demo --python $(PYTHON)
	$(COMPILE) worker lambda_entry.py
	touch $@

install: $(BIN)/.installed

CHECKOV := checkov==3.2.459

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile
	$(BIN)/cfn-lint deploy/template.yaml
	# checkov in a tool environment of its own: its pins would drag the project's down
	$(UV) tool run --python $(PYTHON) --from $(CHECKOV) checkov --quiet --compact --skip-download \
		--framework cloudformation -f deploy/template.yaml 2>/dev/null

test: lint
	$(BIN)/pytest

proto: install
	PATH=$(BIN):$$PATH $(BIN)/python -m grpc_tools.protoc -Iworker/loader/extract --python_out=worker/loader/extract --mypy_out=worker/loader/extract worker/loader/extract/outputfile.proto

demo: $(BIN)/.installed-demo
	$(BIN)/worker demo

bench: install
	$(COMPILE) worker lambda_entry.py benchmarks  # measured as the image runs: compiled
	$(BIN)/python -m benchmarks
	$(BIN)/python -m benchmarks.encode
	$(BIN)/python -m benchmarks.fleet  # many writers, one table: WRITE_PACE=adaptive, 1-1,000

clean:
	rm -rf $(VENV) $(TOOLS) node_modules .mypy_cache .pytest_cache .ruff_cache
