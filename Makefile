# The README's two commands: `make run` and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
COMPILED := $(VENV)/.compiled-O
POLICY ?= examples/policy.yaml
# Three workers, each taking whole test files (module fixtures stay in one process; every test
# isolates its own state). Many tests wait on a gateway, a site or a timeout, so on two cores a
# third worker still gains: 1 126-1 143 s for the whole CI run against 1 375-1 511 s with two on
# stop 33's slow host, 850-876 s with three on stop 34's (PYTEST_ARGS= for one process). The
# load it adds once made a race in mitmproxy's read loop show (addons/connection_tasks.py).
PYTEST_ARGS ?= -n 3 --dist loadfile

.PHONY: run test lint bench bench-deps soak services clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 12), "crawlwarden needs Python 3.12+, found " + sys.version'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# --no-compile: the ~1 GB of packages are not all imported; what is gets compiled as it is
	# (~25 s of a CI run).
	$(BIN)/python -m pip install --quiet --no-compile -e '.[dev]'
	touch $(STAMP)

# `crawlwarden run` restarts itself under python -O (proxy/cli.py): its bytecode too, so that a
# first start does not compile it. Not for `make test` (~20 s of a CI run): the tests' gateways
# write what they import as they import it.
$(COMPILED): $(STAMP)
	$(BIN)/python -O -m compileall -q -j 0 $(VENV)/lib proxy addons >/dev/null
	touch $(COMPILED)

run: $(COMPILED)
	$(BIN)/crawlwarden run --policy $(POLICY)

services:
	.ci/services

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: $(STAMP) services lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The benchmark (bench/README.md): bounded, loopback only, not part of `make test`. Its upstream is
# Debian's nginx-light, installed by .ci/nginx when missing. BENCH_ARGS/SOAK_ARGS pass options
# through, e.g. `make bench BENCH_ARGS=--quick` or `make soak SOAK_ARGS="--rate 150"`.
BENCH_ARGS ?=
SOAK_ARGS ?=

bench-deps:
	CI=true .ci/nginx

bench: $(COMPILED) bench-deps
	$(BIN)/python bench/run.py $(BENCH_ARGS)

soak: $(COMPILED) bench-deps
	$(BIN)/python bench/run.py --soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .crawlwarden .mypy_cache .ruff_cache .pytest_cache
