"""Scenario 10: the database restarts while workers run → they reconnect, every operation
finishes exactly once.

The shared PostgreSQL is never touched: the test starts a PRIVATE cluster (``pg_private``),
migrates it, and runs two DB-polling worker subprocesses against it. The cluster is stopped
(fast shutdown: every connection is cut) and started again twice: once while the workers are
busy, once while they are idle waiting for work. The handler (``db-effect``) is
``atomic=True``, so its Effect row commits with the finish: an attempt cut short by the restart
leaves nothing, and its lease recovery retries it.
"""

from __future__ import annotations

import os
import time

import pytest

from .pg_private import Processes, postgres_bin_dir, private_postgres, subprocess_env, wait_until

pytestmark = [
    pytest.mark.reliability,
    pytest.mark.timeout(150),
    # Locally a machine may lack the server binaries; in CI that is a failure, not a skip.
    pytest.mark.skipif(
        postgres_bin_dir() is None and not os.environ.get("CI"),
        reason="PostgreSQL server binaries not installed",
    ),
]

BUSY_OPERATIONS = 240
IDLE_OPERATIONS = 20
DOWNTIME = 2.0


def _query(pg, sql: str) -> list[tuple]:
    """One query on a fresh connection (the server may have restarted since the last one)."""
    try:
        with pg.connect("bf_restart") as conn:
            return conn.execute(sql).fetchall()
    except Exception:
        return []


def _finished(pg) -> int:
    rows = _query(
        pg, "SELECT count(*) FROM batchframework_batchoperation WHERE status = 'finished'"
    )
    return rows[0][0] if rows else -1


def _enqueue(processes: Processes, count: int, seconds: float) -> None:
    processes.run_python(
        "enqueue",
        f"""
        from batchframework import enqueue_many
        enqueue_many("db-effect", [{{"input_data": {{"seconds": {seconds}}}}}] * {count})
    """,
    )


def _restart(pg) -> None:
    pg.stop("fast")
    time.sleep(DOWNTIME)
    pg.start()


def test_workers_reconnect_after_database_restart(tmp_path, reliability_report):
    started = time.monotonic()
    total = BUSY_OPERATIONS + IDLE_OPERATIONS
    with private_postgres() as pg:
        url = pg.create_database("bf_restart")
        processes = Processes(tmp_path, subprocess_env(url))
        try:
            processes.run_python(
                "migrate",
                """
                from django.core.management import call_command
                call_command("migrate", verbosity=0)
            """,
            )
            _enqueue(processes, BUSY_OPERATIONS, 0.03)
            workers = [processes.worker(f"dbworker{i}", "--name", f"w{i}") for i in range(2)]

            # Restart 1: the workers are in the middle of the batch.
            wait_until(
                lambda: _finished(pg) >= BUSY_OPERATIONS // 5,
                timeout=40,
                what="a fifth of the operations to finish",
            )
            _restart(pg)
            wait_until(
                lambda: _finished(pg) == BUSY_OPERATIONS,
                timeout=60,
                what=f"all {BUSY_OPERATIONS} operations to finish after restart 1",
            )

            # Restart 2: the workers are idle, sleeping between polls.
            time.sleep(1.0)
            _restart(pg)
            time.sleep(1.5)  # let the workers find out
            _enqueue(processes, IDLE_OPERATIONS, 0.0)
            wait_until(
                lambda: _finished(pg) == total,
                timeout=30,
                what="the operations enqueued after restart 2 to finish",
            )

            alive = [w.poll() is None for w in workers]
            statuses = dict(
                ((s, r), n)
                for s, r, n in _query(
                    pg,
                    "SELECT status, result, count(*) FROM batchframework_batchoperation"
                    " GROUP BY 1, 2",
                )
            )
            effects = _query(pg, "SELECT count(*), count(DISTINCT key) FROM testapp_effect")[0]
            runs = _query(pg, "SELECT key, count(*) FROM testapp_execution GROUP BY key")
            duplicates = sum(1 for _, n in runs if n > 1)
            successful = statuses.get(("finished", "successful"), 0)
            reliability_report(
                10,
                operations=total,
                runs=sum(n for _, n in runs),
                duplicates=duplicates,
                lost=total - successful,
                seconds=time.monotonic() - started,
                restarts=2,
                workers_alive=sum(alive),
            )
            assert statuses == {("finished", "successful"): total}, statuses
            assert effects == (total, total)
            assert duplicates == 0
            assert all(alive), (
                "a worker died instead of reconnecting:\n" + processes.logs("dbworker")[-6000:]
            )
        finally:
            processes.cleanup()
