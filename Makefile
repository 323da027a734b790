# uvgate developer commands. `make run` and `make test` are all most people need.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.uvgate-installed
RUN_CONFIG ?= configs/dev.toml
# e.g. make run ARGS="--workers 4", make bench ARGS="--runs 5 --duration 20s"
ARGS ?=

.PHONY: help venv test lint fmt run bench clean distclean

help:
	@echo "make run        start Redis, the stubs and the proxy (configs/dev.toml); prints URLs and a curl"
	@echo "make test       ruff, ruff format --check, mypy --strict, pytest"
	@echo "make lint       ruff, ruff format --check, mypy --strict"
	@echo "make fmt        apply ruff format and the safe ruff fixes"
	@echo "make bench      wrk benchmark: direct-to-backend vs through the proxy (needs wrk)"
	@echo "make clean      remove caches and build output (make distclean also removes $(VENV))"

venv: $(STAMP)

# Reinstall only when the packaging files change.
$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

fmt: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

run: venv
	$(BIN)/python -m devstack run --config $(RUN_CONFIG) $(ARGS)

bench: venv
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
