# Developer and CI entry points. Everything is installed into .venv from
# pyproject.toml: the package with its extras and the dependency groups.

VENV := .venv
BIN := $(VENV)/bin

# The newest interpreter >= 3.12 (Django 6 needs it), so that `make test` runs
# the newest combination of Python and Django. pyenv's shims answer only for
# the selected version, so its installed versions are tried as well.
PYTHON ?= $(shell for p in python3.13 python3.12 python3 \
	$$(ls -d $$HOME/.pyenv/versions/3.1[2-9]*/bin/python3 2>/dev/null | sort -rV); do \
	"$$p" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1 && { command -v "$$p"; break; }; \
	done)

# Databases of `make test-all`; Django creates and drops test_<name> in them.
POSTGRES_URL ?= postgres://postgres@127.0.0.1:5432/idempotency
MARIADB_URL ?= mysql://root@127.0.0.1:3306/idempotency
PYTEST_ARGS ?=
# The benchmark creates and drops its databases (their names must contain
# "bench"). `make bench` runs it on all three, each result beside its chart in
# docs/ (benchmarks-<database>.png, against benchmarks/baseline/<database>.json);
# BENCH_DATABASE_URL=... runs it on that one database only.
BENCH_POSTGRES_URL ?= postgres://postgres@127.0.0.1:5432/idempotency_bench
BENCH_MARIADB_URL ?= mysql://root@127.0.0.1:3306/idempotency_bench
BENCH_SQLITE_URL ?= sqlite:///$(CURDIR)/build/bench.sqlite3
BENCH_DATABASE_URL ?=
BENCH_ARGS ?=
NOX_ARGS ?=

# mysqlclient needs libmariadb-dev and pkg-config: installed only when needed.
DRIVERS := $(if $(filter mysql%,$(DATABASE_URL)),$(VENV)/.installed-mysql)
BENCH_DRIVERS := $(if $(BENCH_DATABASE_URL),$(if $(filter mysql%,$(BENCH_DATABASE_URL)),$(VENV)/.installed-mysql),$(VENV)/.installed-mysql)
BENCH_REDIS := $(if $(REDIS_URL),--redis-url $(REDIS_URL))

.PHONY: help install demo test test-all matrix lint docs bench bench-quick dist

help:
	@echo "make demo         run the example shop on http://127.0.0.1:8000 (SQLite)"
	@echo "make test         run the tests (SQLite, or DATABASE_URL / REDIS_URL if set)"
	@echo "make test-all     run the tests on SQLite, PostgreSQL and MariaDB"
	@echo "make matrix       the nox sessions: Django x Python, the wheel, no DRF (NOX_ARGS=...)"
	@echo "make lint         ruff and mypy"
	@echo "make docs         build the documentation into build/site (warnings are errors)"
	@echo "make bench        the benchmark on PostgreSQL, MariaDB, SQLite (or BENCH_DATABASE_URL; REDIS_URL)"
	@echo "make dist         build the sdist and wheel into dist/ and check them with twine"

$(BIN)/python:
	@test -n "$(PYTHON)" || { echo "No Python >= 3.12 found: make PYTHON=/path/to/python3.12" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=25.1"  # for --group

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[drf,redis,spectacular,celery]" --group test
	@touch $@

$(VENV)/.installed-%: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet --group $*
	@touch $@

install: $(VENV)/.installed

demo: install $(DRIVERS)
	$(BIN)/python manage.py migrate --no-input
	$(BIN)/python manage.py seed_demo
	$(BIN)/python manage.py runserver 127.0.0.1:8000

test: install $(DRIVERS)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: install
	env -u DATABASE_URL $(MAKE) test
	DATABASE_URL=$(POSTGRES_URL) $(MAKE) test
	DATABASE_URL=$(MARIADB_URL) $(MAKE) test

# nox finds pyenv's interpreters itself (noxfile.py) and uses uv from .venv.
matrix: $(VENV)/.installed-nox
	$(BIN)/nox $(NOX_ARGS)

lint: $(VENV)/.installed-lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# NO_MKDOCS_2_WARNING: Material's banner about its successor, printed on every build.
docs: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: $(VENV)/.installed-bench $(BENCH_DRIVERS)
	@mkdir -p build
ifneq ($(BENCH_DATABASE_URL),)
	$(BIN)/python benchmarks/run.py --database-url $(BENCH_DATABASE_URL) $(BENCH_REDIS) $(BENCH_ARGS)
else
	for run in postgresql=$(BENCH_POSTGRES_URL) mariadb=$(BENCH_MARIADB_URL) sqlite=$(BENCH_SQLITE_URL); do \
		name=$${run%%=*}; \
		$(BIN)/python benchmarks/run.py --database-url "$${run#*=}" $(BENCH_REDIS) $(BENCH_ARGS) \
			--output build/bench-$$name.md --json build/bench-$$name.json \
			--chart docs/benchmarks-$$name.png --baseline benchmarks/baseline/$$name.json \
			|| exit 1; \
	done
endif

bench-quick:
	$(MAKE) bench BENCH_ARGS="--quick $(BENCH_ARGS)"

dist: $(VENV)/.installed-release
	rm -rf dist
	$(BIN)/python -m build
	$(BIN)/twine check --strict dist/*
