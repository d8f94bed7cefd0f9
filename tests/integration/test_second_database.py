"""The original's creation methods on a database other than ``default``: through
``db_manager(alias)``, they write where Django's own ``create`` would. PostgreSQL only: the
second alias is a second test database on the same server."""

from __future__ import annotations

import pytest
from django.db import connections

from batchframework import BatchOperation
from tests.celery.helpers import add_postgresql_alias

#: A second database holding batchframework's tables (its own test database).
OTHER = "second_database"


def _own_test_database(database: dict) -> None:
    test_name = database["TEST"].get("NAME") or f"test_{database['NAME']}"
    database["TEST"]["NAME"] = f"{test_name}_second"


HAS_OTHER = add_postgresql_alias(OTHER, _own_test_database)

pytestmark = [pytest.mark.timeout(60)]


@pytest.mark.skipif(not HAS_OTHER, reason="a second PostgreSQL test database is needed")
@pytest.mark.django_db(databases=["default", OTHER])
@pytest.mark.parametrize("method", ["create_asynchronous", "create_synchronous"])
def test_the_creation_methods_write_to_the_managers_database(method):
    """``BatchOperation.objects.db_manager(alias).create_asynchronous(...)`` (and its
    synchronous twin) stores the operation in ``alias``, as Django's own ``create`` does, and
    nothing in ``default``."""
    operation = getattr(BatchOperation.objects.db_manager(OTHER), method)(operationtype="x")
    assert operation._state.db == OTHER
    assert BatchOperation.objects.using(OTHER).filter(pk=operation.pk).exists()
    assert not BatchOperation.objects.using("default").exists()
    assert connections[OTHER].settings_dict["NAME"] != connections["default"].settings_dict["NAME"]
