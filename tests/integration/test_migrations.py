"""Migration 0003 drops the indexes no query uses, and ``migrate batchframework 0002`` puts
them back as Django made them; on MySQL/MariaDB, migration 0004 leads the claim's index with
``status`` (no partial indexes there), and ``migrate batchframework 0003`` undoes it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.db import connection, models
from django.db.migrations.executor import MigrationExecutor
from django.db.models import Q
from django.test import override_settings

from batchframework.models import BatchOperation

pytestmark = pytest.mark.django_db(transaction=True)

TABLE = BatchOperation._meta.db_table
BEFORE = ("batchframework", "0002_ready_index_orders_by_id")
AFTER = ("batchframework", "0003_drop_unused_indexes")
LATEST = ("batchframework", "0004_mysql_ready_index")
VENDOR = connection.vendor


def _indexes() -> dict[str, tuple[tuple[str, ...], bool]]:
    """Every index of the table: name → (columns, unique)."""
    with connection.cursor() as cursor:
        constraints = connection.introspection.get_constraints(cursor, TABLE)
    return {
        name: (tuple(info["columns"]), bool(info["unique"]))
        for name, info in constraints.items()
        if info["index"] or info["unique"]
    }


def _migrate(target: tuple[str, str]) -> None:
    executor = MigrationExecutor(connection)
    executor.migrate([target])


@pytest.fixture
def back_at_latest() -> Iterator[None]:
    """Whatever the test does, leave the schema fully migrated for the tests after it: every
    app's, since migrating batchframework back also unapplies the test app's migrations that
    depend on it (their tables would be missing for the tests after this one)."""
    try:
        yield
    finally:
        executor = MigrationExecutor(connection)
        executor.migrate(executor.loader.graph.leaf_nodes())


def test_the_latest_schema_has_no_index_the_engine_does_not_use():
    indexes = _indexes()
    by_columns = [columns for columns, _unique in indexes.values()]
    # The content type alone is served by the (content type, object id) index.
    assert ("context_content_type_id", "context_object_id") in by_columns
    if VENDOR != "mysql":  # MySQL/MariaDB: InnoDB, not Django, indexes foreign keys
        assert ("context_content_type_id",) not in by_columns
    # The plain operationtype index and debounce_key's unique index stay.
    assert ("operationtype",) in by_columns
    assert (("debounce_key",), True) in indexes.values()
    if VENDOR == "postgresql":
        assert [name for name in indexes if name.endswith("_like")] == []


def test_migrating_back_restores_exactly_the_dropped_indexes(back_at_latest):
    latest = _indexes()

    _migrate(BEFORE)
    before = _indexes()

    assert set(latest) <= set(before)
    restored = {before[name] for name in set(before) - set(latest)}
    expected = {
        "postgresql": {
            (("context_content_type_id",), False),
            (("operationtype",), False),  # the _like ones
            (("debounce_key",), False),
        },
        "sqlite": {(("context_content_type_id",), False)},
        "mysql": set(),
    }[VENDOR]
    assert restored == expected
    if VENDOR == "postgresql":
        assert sorted(name for name in before if name.endswith("_like")) == [
            f"{TABLE}_debounce_key_47f0e9ea_like",
            f"{TABLE}_operationtype_eabd9cbe_like",
        ]

    _migrate(LATEST)
    assert _indexes() == latest


#: The claim's index: partial (unprocessed rows only) where the database has partial indexes;
#: on MySQL/MariaDB led by the status instead, so that a claim never walks finished history.
READY_INDEX = {
    "mysql": ("status", "priority", "run_after", "id"),
    "postgresql": ("priority", "run_after", "id"),
    "sqlite": ("priority", "run_after", "id"),
}[VENDOR]


def test_the_claims_index_reads_only_unprocessed_rows(back_at_latest):
    assert _indexes()["batchop_ready_idx"] == (READY_INDEX, False)
    _migrate(AFTER)
    django_made = ("priority", "run_after", "id")  # on MySQL: without its condition
    assert _indexes()["batchop_ready_idx"] == (django_made, False)
    _migrate(LATEST)
    assert _indexes()["batchop_ready_idx"] == (READY_INDEX, False)


class OperationsElsewhere:
    """A router that keeps the operations table out of every database it is asked about."""

    def allow_migrate(self, db, app_label, model_name=None, **hints):
        return False if model_name == "batchoperation" else None


def test_migration_0004_leaves_alone_a_database_the_router_keeps_the_table_out_of(
    back_at_latest,
):
    """Its statement names the table, so it must ask the router about the model, as Django's
    own index operations do: a database without the table would fail the whole migrate."""
    if VENDOR != "mysql":
        pytest.skip("migration 0004 changes nothing elsewhere")
    _migrate(AFTER)
    with override_settings(DATABASE_ROUTERS=[f"{__name__}.OperationsElsewhere"]):
        _migrate(LATEST)
        assert _indexes()["batchop_ready_idx"] == (("priority", "run_after", "id"), False)
        _migrate(AFTER)  # recorded as unapplied again: the fixture applies it for real


def test_the_model_raises_no_warning_about_its_partial_indexes(monkeypatch):
    """Django warns (``models.W037``) that MySQL ignores index conditions; the model's partial
    indexes all serve MySQL too, so the project's checks stay quiet, until one that doesn't
    is added."""
    assert [e.id for e in BatchOperation.check(databases=["default"])] == []
    if VENDOR == "mysql":
        another = models.Index(fields=["queue"], name="another_idx", condition=Q(status="running"))
        indexes = [*BatchOperation._meta.indexes, another]
        monkeypatch.setattr(BatchOperation._meta, "indexes", indexes)
        assert "models.W037" in [e.id for e in BatchOperation.check(databases=["default"])]
