"""``manage.py demo`` end to end: a real Celery worker and beat, then the demo's own checks.

Once on the embedded default (SQLite and the filesystem broker, nothing to install) and once on
PostgreSQL and Redis.
"""

from __future__ import annotations

import uuid

import pytest

from .helpers import example_environment, require_server, run_manage

DEMO_TIMEOUT = 120
POSTGRES_SERVER = "postgres://postgres@127.0.0.1:5432"
#: Redis database 14: the Celery tests use 15.
REDIS_URL = "redis://127.0.0.1:6379/14"

pytestmark = pytest.mark.slow


def assert_demo_passed(result) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "Demo passed: all" in result.stdout, output[-6000:]
    assert "FAIL" not in result.stdout
    # The table shows the cancelled notifications and the poller-driven ones.
    assert "cancelled (the row was deleted: it never runs)" in result.stdout
    assert "ok   celery beat ran the batchframework poller" in result.stdout


def test_demo_on_the_embedded_default(tmp_path):
    result = run_manage("demo", env=example_environment(tmp_path), timeout=DEMO_TIMEOUT)
    assert_demo_passed(result)
    assert "Database: sqlite3" in result.stdout
    assert "Broker:   filesystem://" in result.stdout
    assert (tmp_path / "demo" / "worker.log").exists()


@pytest.fixture
def fresh_postgres_database():
    require_server(POSTGRES_SERVER, 5432)
    import psycopg

    name = f"example_demo_{uuid.uuid4().hex[:10]}"
    admin_url = f"{POSTGRES_SERVER}/postgres"
    with psycopg.connect(admin_url, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{POSTGRES_SERVER}/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.celery
def test_demo_on_postgresql_and_redis(tmp_path, fresh_postgres_database):
    require_server(REDIS_URL, 6379)
    env = example_environment(
        tmp_path, DATABASE_URL=fresh_postgres_database, CELERY_BROKER_URL=REDIS_URL
    )
    result = run_manage("demo", env=env, timeout=DEMO_TIMEOUT)
    assert_demo_passed(result)
    assert "Database: postgresql" in result.stdout
    assert "Broker:   redis://" in result.stdout
