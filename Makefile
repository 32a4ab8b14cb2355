# The two commands of the README:
#   make run    install, then run the whole pipeline on the embedded default (`mlflow run .`)
#   make test   install, then run the test suite
# Both install into .venv through tools/install.sh (hash-locked; mmcv-full built once and cached).
SHELL := /bin/bash
VENV ?= .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db
PYTEST_ARGS ?=

.PHONY: install run test lint lock benchmark clean-data

install:
	@UDA_VENV=$(VENV) tools/install.sh

run: install
	mlflow run . --env-manager local

test: install
	MLFLOW_DISABLE_TELEMETRY=true python -m pytest $(PYTEST_ARGS)

# One style, kept by ruff (settings in pyproject.toml); `ruff format .` and `ruff check --fix .` apply it.
lint: install
	ruff format --check .
	ruff check .

# Re-resolve requirements/main.in into the hash-locked requirements/main.txt (needs `uv`).
lock:
	uv pip compile requirements/main.in --generate-hashes --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 --no-header --index-url https://pypi.org/simple \
	  --no-emit-package typing -o requirements/main.txt

benchmark: install
	python tools/benchmark_models.py --preset tiny

# Only what the synthetic generator wrote (marked folders), never anything else.
clean-data:
	python -m uda.data.synthetic --clean
