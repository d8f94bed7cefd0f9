"""The database-tagged system checks: SQLite's transaction mode, the relay's database."""

from types import SimpleNamespace

import pytest
from django.conf import settings
from django.core import checks
from django.db import connection, connections
from django.test import override_settings

from batchframework.checks import check_sqlite_transaction_mode
from batchframework_celery.checks import check_relay


@pytest.mark.skipif(connection.vendor != "sqlite", reason="a check about SQLite settings")
def test_sqlite_without_immediate_transactions_gets_a_warning(monkeypatch):
    assert check_sqlite_transaction_mode(databases=["default"]) == []  # the tests use IMMEDIATE
    monkeypatch.setitem(connection.settings_dict, "OPTIONS", {"timeout": 5})
    [warning] = check_sqlite_transaction_mode(databases=["default"])
    assert warning.id == "batchframework.W003"
    assert "IMMEDIATE" in warning.hint


@pytest.mark.parametrize(
    ("engine", "mode", "warned"),
    [
        ("django.db.backends.sqlite3", "EXCLUSIVE", False),  # waits for the lock too
        ("django.db.backends.sqlite3", "DEFERRED", True),
        ("django.contrib.gis.db.backends.spatialite", "", True),  # SQLite's locking
    ],
)
def test_the_sqlite_check_judges_the_database_not_the_engine_name(
    monkeypatch, engine, mode, warned
):
    monkeypatch.setattr(connection, "vendor", "sqlite")
    monkeypatch.setitem(connection.settings_dict, "ENGINE", engine)
    monkeypatch.setitem(connection.settings_dict, "OPTIONS", {"transaction_mode": mode})
    found = [m.id for m in check_sqlite_transaction_mode(databases=["default"])]
    assert found == (["batchframework.W003"] if warned else [])


@pytest.mark.parametrize(
    ("path", "needle"),
    [
        ("tests.testapp.dispatcher_import_fails.Dispatcher", "fails to import"),
        ("batchframework.dispatch.no_such_name", "cannot be imported"),
        ("batchframework.dispatch.get_dispatcher", "is not a Dispatcher subclass"),
    ],
    ids=["module-raises", "missing-name", "not-a-class"],
)
def test_a_dispatcher_that_cannot_be_loaded_is_reported_not_raised(path, needle):
    """A module that raised while importing crashed ``manage.py check`` (or, raising
    ImproperlyConfigured, was said to be no Dispatcher subclass)."""
    with override_settings(BATCHFRAMEWORK={**settings.BATCHFRAMEWORK, "DISPATCHER": path}):
        [error] = [m for m in checks.run_checks() if m.id == "batchframework.E005"]
    assert needle in error.msg


class _RaisingRouter:
    def db_for_write(self, model, **hints):
        raise RuntimeError("router down")


class _UnknownAliasRouter:
    def db_for_write(self, model, **hints):
        return "no-such-database"


@pytest.mark.parametrize("router", ["_RaisingRouter", "_UnknownAliasRouter"])
def test_the_relay_check_reports_a_router_that_gives_no_database(router):
    relay = {
        **settings.BATCHFRAMEWORK,
        "DISPATCHER": "batchframework_celery.dispatcher.RelayDispatcher",
    }
    with override_settings(BATCHFRAMEWORK=relay, DATABASE_ROUTERS=[f"{__name__}.{router}"]):
        [error] = check_relay()
    assert error.id == "batchframework_celery.E001" and "router" in error.msg


def test_other_databases_and_no_database_get_no_warning():
    assert check_sqlite_transaction_mode(databases=None) == []
    if connection.vendor != "sqlite":
        assert check_sqlite_transaction_mode(databases=["default"]) == []


def test_relay_dispatcher_needs_postgresql_and_psycopg_3_2_4(monkeypatch):
    assert check_relay() == []  # the tests' dispatcher is not the relay
    relay = {
        **settings.BATCHFRAMEWORK,
        "DISPATCHER": "batchframework_celery.dispatcher.RelayDispatcher",
    }
    with override_settings(BATCHFRAMEWORK=relay):
        if connection.vendor != "postgresql":
            [warning] = check_relay()
            assert warning.id == "batchframework_celery.W005"
            assert connection.vendor in warning.msg
            return
        assert check_relay() == []  # the suite runs psycopg 3.2.4+
        for name, version in [
            ("psycopg", "3.1.19"),
            ("psycopg", "3.2.3"),  # notifies() without the backlog: the relay would lose some
            ("psycopg2", "2.9.10 (dt dec pq3 ext lo64)"),
        ]:
            monkeypatch.setattr(
                connections["default"],
                "Database",
                SimpleNamespace(__name__=name, __version__=version),
            )
            [error] = check_relay()
            assert error.id == "batchframework_celery.E001"
            assert name in error.msg
