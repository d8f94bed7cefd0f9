"""The database-tagged system checks: SQLite's transaction mode, the relay's database."""

from types import SimpleNamespace

import pytest
from django.conf import settings
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
