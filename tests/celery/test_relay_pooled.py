"""The relay on a database with Django's connection pool (``OPTIONS["pool"]``): closing a
pooled connection hands its session back to the pool, with whatever it holds. A relay that
restarts after an error must still get its advisory lock, so it lets go of it (and of its
LISTEN) before it closes. PostgreSQL only; the relay runs as a thread of the test process."""

from __future__ import annotations

import contextlib
import logging

import pytest
from django.conf import settings
from django.db import connection, connections
from django.test import override_settings

from batchframework_celery.relay import Relay

from .helpers import add_postgresql_alias, wait_for

#: An alias of the test database whose connections come from a pool.
POOLED = "relay_pooled"


def _pooled_mirror(database: dict) -> None:
    database["OPTIONS"] = {**database.get("OPTIONS", {}), "pool": {"min_size": 2, "max_size": 4}}
    database["CONN_MAX_AGE"] = 0  # Django's pool replaces persistent connections
    database["TEST"]["MIRROR"] = "default"


pytestmark = [
    pytest.mark.celery,
    pytest.mark.skipif(
        not add_postgresql_alias(POOLED, _pooled_mirror),
        reason="NOTIFY and the pool are PostgreSQL's",
    ),
    pytest.mark.django_db(transaction=True, databases=["default", POOLED]),
    pytest.mark.timeout(60),
]


class OperationsPooled:
    """Writes batchframework's rows through the pooled alias (so the relay listens there)."""

    def db_for_write(self, model, **hints):
        return POOLED if model._meta.app_label == "batchframework" else None

    db_for_read = db_for_write


RELAY = {**settings.BATCHFRAMEWORK, "POLL_INTERVAL": 0.2}


def advisory_lock_holders() -> list[int]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        return sorted(row[0] for row in cursor.fetchall())


@override_settings(DATABASE_ROUTERS=[f"{__name__}.OperationsPooled"], BATCHFRAMEWORK=RELAY)
def test_a_relay_on_pooled_connections_takes_its_lock_again_after_an_error(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="batchframework")
    sessions: list[int] = []
    real_wait_for_lock = Relay._wait_for_lock

    def wait_for_lock_then_fail_once(self, relay_connection):
        held = real_wait_for_lock(self, relay_connection)
        sessions.append(relay_connection.connection.info.backend_pid)
        if len(sessions) == 1:
            raise RuntimeError("injected: the relay's session hit an error")
        return held

    monkeypatch.setattr(Relay, "_wait_for_lock", wait_for_lock_then_fail_once)
    # A full pool hands out its sessions in turn: the relay's next one is another session.
    connections[POOLED].ensure_connection()  # opens the pool
    connections[POOLED].close()
    connections[POOLED].pool.wait(timeout=10)
    relay = Relay()
    assert relay.alias == POOLED
    relay.start()
    try:
        assert wait_for(lambda: "event=relay_started" in caplog.text, timeout=20), (
            f"the relay never held its lock again: {caplog.text}"
        )
        assert len(sessions) == 2
        assert sessions[0] != sessions[1], "the pool gave the same session back"
        assert advisory_lock_holders() == [sessions[1]]
        relay.stop(timeout=10)
        # The relay's session settings (statement_timeout among them) did not go back to the
        # pool with its sessions: a task drawing one must not inherit a 5 s statement limit.
        assert pooled_settings("statement_timeout", "idle_session_timeout") == {("0", "0")}
    finally:
        relay.stop(timeout=10)
        connections[POOLED].close_pool()
    assert not relay.is_alive()


def pooled_settings(*names: str) -> set[tuple[str, ...]]:
    """The values of ``names`` in every session of the pool (all drawn at once)."""
    pool = connections[POOLED].pool
    with contextlib.ExitStack() as stack:
        sessions = [stack.enter_context(pool.connection(timeout=10)) for _ in range(pool.max_size)]
        return {
            tuple(session.execute(f"SHOW {name}").fetchone()[0] for name in names)
            for session in sessions
        }
