# Every target creates the virtual environment it needs first.
#   make test                 the test suite (SQLite unless DATABASE_URL is set)
#   make demo                 the example project's demo (real Celery worker + beat, ~1 minute)
#   make run                  the example project: web + worker + beat, for local development
#   make bench                the benchmark suite (BENCH_ARGS=--quick for the short mode)
# Variables: PYTHON (interpreter for the venv), VENV (its folder), DJANGO (e.g. '>=5.2,<6'),
#            DATABASE_URL (postgres://…, mysql://…, sqlite:///…), PYTEST_ARGS.

PYTHON ?= python3
VENV ?= .venv
DJANGO ?=
PYTEST_ARGS ?=
BIN := $(VENV)/bin

.PHONY: venv mysql-driver test lint typecheck migrations-check docs demo run bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,celery]' $(if $(DJANGO),'Django$(DJANGO)')
	touch $@

venv: $(BIN)/.installed

# The MariaDB/MySQL driver (mysqlclient) has no wheels for Linux: it builds against the client
# library's headers (Debian: libmariadb-dev and pkg-config). So it is installed only for a run
# against such a database, and nothing else needs it.
$(BIN)/.installed-mysql: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -e '.[mysql]' $(if $(DJANGO),'Django$(DJANGO)')
	touch $@

mysql-driver: $(BIN)/.installed-mysql

DB_DRIVER := $(if $(filter mysql://% mysql2://%,$(DATABASE_URL)),mysql-driver)

test: venv $(DB_DRIVER)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check batchframework batchframework_celery tests example_project benchmarks
	$(BIN)/ruff format --check batchframework batchframework_celery

typecheck: venv
	$(BIN)/mypy batchframework batchframework_celery tests/typecheck

migrations-check: venv
	DJANGO_SETTINGS_MODULE=tests.settings PYTHONPATH=. $(BIN)/django-admin makemigrations --check --dry-run

docs: venv
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html

demo: venv
	$(BIN)/python example_project/manage.py demo

run: venv
	$(BIN)/python example_project/manage.py run_all

BENCH_ARGS ?=
bench: venv
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) docs/_build .pytest_cache .mypy_cache .ruff_cache
