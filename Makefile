# uvgate developer commands. `make run` and `make test` are all most people need.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.uvgate-installed
# The hot-path modules are compiled in place with mypyc (setup.py lists them); any change under
# proxy/ rebuilds them. `UVGATE_PURE_PYTHON=1 make build` leaves the tree pure Python instead.
COMPILED := $(VENV)/.uvgate-compiled
# The bench extra (Locust, matplotlib for the chart), installed once by `make bench`.
BENCH_EXTRA := $(VENV)/.uvgate-bench-extra
PROXY_SOURCES := $(wildcard proxy/*.py proxy/*/*.py proxy/*.c)
RUN_CONFIG ?= configs/dev.toml
# e.g. make run ARGS="--workers 4", make bench ARGS="--runs 5 --duration 20s", make bench ARGS="--baseline main"
ARGS ?=

# e.g. FUZZ_TIME=3600 make fuzz (seconds, shared by the two harnesses); ORACLE_COUNT=100000 make oracle
FUZZ_TIME ?= 300
ORACLE_COUNT ?= 100000

.PHONY: help venv build test lint fmt run bench clean distclean fuzz oracle

help:
	@echo "make run        start Redis, the stubs and the proxy (configs/dev.toml); prints URLs and a curl"
	@echo "make test       ruff, ruff format --check, mypy --strict, pytest (on the compiled build)"
	@echo "make build      compile the hot-path modules with mypyc (done by run, test and bench)"
	@echo "make lint       ruff, ruff format --check, mypy --strict"
	@echo "make fmt        apply ruff format and the safe ruff fixes"
	@echo "make fuzz       coverage-guided fuzzing of request and response framing (atheris; FUZZ_TIME=300 s)"
	@echo "make oracle     the differential oracle (proxy vs h11) over ORACLE_COUNT=100000 inputs of each kind"
	@echo "make bench      wrk: scenarios (plain, realistic, jwt, body, workers) against the backend direct,"
	@echo "                nginx, HAProxy, Caddy (those installed) and uvgate; table, JSON and PNG in bench/results/"
	@echo "                ARGS=\"--scenario plain --target nginx,proxy\" for less; ARGS=\"--baseline main\" adds main's proxy"
	@echo "                ARGS=\"--target proxy,nometrics,accesslog\": what metrics and the access log cost"
	@echo "make clean      remove caches and build output (make distclean also removes $(VENV))"

venv: $(STAMP)

# Reinstall only when the packaging files change.
# The editable install compiles the hot path in place too, and maps the shared library of the
# compiled modules (uvgate__mypyc, top level) so that they import from any directory.
$(STAMP): setup.cfg pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@ $(COMPILED)

build: $(COMPILED)

$(COMPILED): $(STAMP) $(PROXY_SOURCES)
	rm -f proxy/*.so proxy/*/*.so uvgate__mypyc*.so
	$(BIN)/python setup.py -q build_ext --inplace
	for f in proxy/*.so proxy/*/*.so uvgate__mypyc*.so; do if [ -e "$$f" ]; then touch "$$f"; fi; done
	touch $@

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint build
	$(BIN)/pytest -q

fmt: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

run: build
	$(BIN)/python -m devstack run --config $(RUN_CONFIG) $(ARGS)

$(BENCH_EXTRA): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	touch $@

bench: build $(BENCH_EXTRA)
	$(BIN)/python -m bench $(ARGS)

# Fuzzing runs the pure-Python sources (atheris instruments Python bytecode, not compiled modules);
# findings land in .fuzz/<harness>/crash-*, the growing corpus in .fuzz/<harness>/corpus.
fuzz: venv
	$(BIN)/python -m pip install -q -e '.[fuzz]'
	$(BIN)/python -m tests.fuzz.run --seconds $(FUZZ_TIME)

oracle: build
	UVGATE_ORACLE_COUNT=$(ORACLE_COUNT) $(BIN)/pytest -q -s -p no:cacheprovider tests/framing/test_oracle.py -k agree

clean:
	rm -rf build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis $(COMPILED)
	rm -f proxy/*.so proxy/*/*.so uvgate__mypyc*.so
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
