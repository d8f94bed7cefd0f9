"""The database-tagged system check for SQLite's transaction mode."""

import pytest
from django.db import connection

from batchframework.checks import check_sqlite_transaction_mode


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
