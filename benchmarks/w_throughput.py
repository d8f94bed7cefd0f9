"""W1 throughput and W5 memory and scale.

W1: N no-op operations due now are stored first (with their Celery messages, for the Celery
path); then the worker node starts and the clock runs until the database says all finished.
Baseline: N plain Celery tasks (no result backend) on the same broker and worker settings,
counted by a Redis counter. Reported per run: ``wall`` (worker spawn → last finish, includes
start-up), ``active`` (first start → last finish) and ops/s over ``active``, the headline.

W5: the same with many more operations while the worker's RSS is sampled from /proc, then
W1 with those finished rows left in the table, alternating with W1 on an empty copy of it.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

from django.db import connection, transaction
from django.db.models import Max, Min

from batchframework import enqueue_many
from batchframework.models import BatchOperation

from .common import NULL_DISPATCHER, Bench, CorrectnessError, db_worker_started, dispatcher, ratio
from .procs import group_rss_kib, wait_until

ENQUEUE_CHUNK = 10_000


def _enqueue_due_now(n: int, transport: str) -> int:
    """Store ``n`` bench-noop operations due now; return the first id."""
    first_id: int | None = None
    with dispatcher(NULL_DISPATCHER if transport == "db" else None):
        for start in range(0, n, ENQUEUE_CHUNK):
            created = enqueue_many("bench-noop", [{}] * min(ENQUEUE_CHUNK, n - start))
            first_id = created[0].pk if first_id is None else first_id
    assert first_id is not None
    return first_id


def _finished_count(first_id: int) -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM batchframework_batchoperation WHERE id >= %s "
            "AND status = 'finished'",
            [first_id],
        )
        return int(cursor.fetchone()[0])


def _all_workers_rate(first_id: int) -> float:
    """Operations per second finished while every worker process ran: from the last process's
    first start to the first process's last finish (a process is its claim tokens' prefix).
    Start-up stays out of it: processes that start up compete with those already running for
    the two cores. NaN if no such moment lasted (a run too short for its processes)."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            WITH ops AS (
                SELECT regexp_replace(claimed_by, ':[0-9a-f]{{12}}(/batch)?$', '') AS process,
                       started_running_datetime AS started, finished_datetime AS finished
                FROM {BatchOperation._meta.db_table} WHERE id >= %s
            ), span AS (
                SELECT max(first_start) AS start, min(last_finish) AS stop FROM (
                    SELECT min(started) AS first_start, max(finished) AS last_finish
                    FROM ops GROUP BY process
                ) AS per_process
            )
            SELECT count(*), extract(epoch FROM (span.stop - span.start))
            FROM ops, span WHERE ops.finished > span.start AND ops.finished <= span.stop
            GROUP BY span.start, span.stop
            """,
            [first_id],
        )
        row = cursor.fetchone()
    if row is None or not row[1] or row[1] <= 0 or row[0] < 100:
        return math.nan
    return row[0] / float(row[1])


def run_tracked(
    bench: Bench,
    *,
    transport: str,
    n: int,
    sample_rss: bool = False,
    env: dict[str, str] | None = None,
    analyze: bool = False,
    db_workers: int = 2,
) -> dict[str, Any]:
    """Run ``n`` tracked no-op operations through ``transport`` ("celery" or "db", with
    ``db_workers`` processes); with ``analyze``, the table's statistics are refreshed after
    they are stored (W5 compares tables whose statistics would otherwise differ: none on an
    empty one)."""
    first_id = _enqueue_due_now(n, transport)
    if analyze:
        with connection.cursor() as cursor:
            cursor.execute(f"ANALYZE {BatchOperation._meta.db_table}")
    timeout = 60 + n / 100
    samples: list[dict[str, Any]] = []
    procs: list[subprocess.Popen[bytes]] = []
    ready_at: float | None = None
    try:
        spawned_at = time.time()
        if transport == "celery":
            proc, tag = bench.start_celery_worker(env=env)
            procs = [proc]
        else:
            procs = bench.start_db_workers(db_workers)
        deadline = time.monotonic() + timeout
        done = 0
        while True:
            bench.procs.check_alive(procs)
            done = _finished_count(first_id)
            now = time.time()
            if ready_at is None:
                if transport == "celery":
                    ready_at = bench.celery_ready_at(tag)
                elif any(db_worker_started(p) for p in procs):
                    ready_at = now
            if sample_rss:
                rss = group_rss_kib(procs)
                samples.append(
                    {
                        "t": now - spawned_at,
                        "done": done,
                        "rss_kib": sum(rss.values()),
                        "per_process_kib": rss,
                    }
                )
            if done >= n:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{transport}: {done}/{n} finished after {timeout:.0f}s")
            time.sleep(0.25 if sample_rss else 0.05)
    finally:
        for proc in procs:
            bench.procs.stop(proc)
    ops = BatchOperation.objects.filter(pk__gte=first_id)
    agg = ops.aggregate(
        first=Min("started_running_datetime"),
        last=Max("finished_datetime"),
        max_attempts=Max("attempts"),
    )
    successful = ops.successful().count()
    if successful != n or agg["max_attempts"] != 1:
        raise CorrectnessError(
            f"{transport}: {successful}/{n} successful, max attempts {agg['max_attempts']} "
            "(expected every operation claimed and run exactly once)"
        )
    first, last = agg["first"].timestamp(), agg["last"].timestamp()
    result = _timings(transport, n, spawned_at, ready_at, first, last)
    result["ops_per_s_all_workers"] = _all_workers_rate(first_id)
    if sample_rss:
        result["rss"] = _rss_summary(samples, n)
    return result


def _rss_summary(samples: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """RSS once 10% of the operations were done vs at the end (the growth W5 bounds)."""
    early = next((s for s in samples if s["done"] >= n * 0.1), samples[0])
    end = samples[-1]
    return {
        "at_10pct_kib": early["rss_kib"],
        "at_10pct_done": early["done"],
        "end_kib": end["rss_kib"],
        "max_kib": max(s["rss_kib"] for s in samples),
        "growth_pct": 100 * (end["rss_kib"] - early["rss_kib"]) / early["rss_kib"],
        "samples": [
            {k: v for k, v in s.items() if k != "per_process_kib"}
            for s in samples[:: max(1, len(samples) // 200)]
        ],
    }


def run_plain_celery(bench: Bench, *, n: int) -> dict[str, Any]:
    """Baseline: ``n`` plain Celery tasks, counted by a Redis INCR."""
    from .benchapp.tasks import bench_incr

    key = f"bench:incr:{uuid.uuid4().hex[:8]}"
    for _ in range(n):
        bench_incr.delay(key, n)
    proc, tag = bench.start_celery_worker()
    try:
        spawned_at = time.time()
        wait_until(
            lambda: bench.redis.get(f"{key}:last"),
            timeout=60 + n / 100,
            interval=0.05,
            what="the plain Celery tasks",
            on_tick=lambda: bench.procs.check_alive([proc]),
        )
        time.sleep(0.3)
        count = int(bench.redis.get(key) or 0)
        ready_at = bench.celery_ready_at(tag)
    finally:
        bench.procs.stop(proc)
    if count != n:
        raise CorrectnessError(f"plain Celery: counter is {count}, expected {n}")
    first = float(bench.redis.get(f"{key}:first"))  # type: ignore[arg-type]
    last = float(bench.redis.get(f"{key}:last"))  # type: ignore[arg-type]
    return _timings("plain-celery", n, spawned_at, ready_at, first, last)


def _timings(
    transport: str, n: int, spawned_at: float, ready_at: float | None, first: float, last: float
) -> dict[str, Any]:
    """Rates from the worker's spawn, the first operation's start and the last one's finish."""
    return {
        "transport": transport,
        "n": n,
        "wall_s": last - spawned_at,
        "active_s": last - first,
        "startup_s": first - spawned_at,
        "ready_s": (ready_at - spawned_at) if ready_at else None,
        "ops_per_s": n / (last - first),
        "ops_per_s_wall": n / (last - spawned_at),
    }


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda r: r["ops_per_s"])
    chosen = dict(ordered[len(ordered) // 2])
    chosen["all_ops_per_s"] = [r["ops_per_s"] for r in runs]
    chosen["all_ops_per_s_wall"] = [r["ops_per_s_wall"] for r in runs]
    return chosen


#: DB worker counts run besides the headline's two (one per core), informative: how throughput
#: grows with workers, and more workers than cores contending for the same rows.
SCALING_DB_WORKERS = (1, 4)


def w1_throughput(bench: Bench, *, n: int, repeats: int, reuse_max: int | None) -> dict[str, Any]:
    """Repeats interleave the variants (baseline, Celery path, DB worker) to share the noise."""
    variants: dict[str, list[dict[str, Any]]] = {"plain": [], "celery": [], "db": []}
    if reuse_max:
        variants["celery_reuse"] = []
    for count in SCALING_DB_WORKERS:
        variants[f"db_x{count}"] = []
    for _ in range(repeats):
        for name, runs in variants.items():
            bench.reset()
            if name == "plain":
                runs.append(run_plain_celery(bench, n=n))
            elif name == "celery_reuse":
                runs.append(
                    run_tracked(
                        bench,
                        transport="celery",
                        n=n,
                        env={"BENCH_CELERY_DB_REUSE_MAX": str(reuse_max)},
                    )
                )
            elif name.startswith("db_x"):
                workers = int(name.removeprefix("db_x"))
                runs.append(run_tracked(bench, transport="db", n=n, db_workers=workers))
            else:
                runs.append(run_tracked(bench, transport=name, n=n))
    result = {name: _median_run(runs) for name, runs in variants.items()}
    base = result["plain"]
    bench.row("W1", f"plain Celery baseline, ops/s (N={n})", base["ops_per_s"])
    bench.row(
        "W1",
        "Celery path, ops/s",
        result["celery"]["ops_per_s"],
        base["ops_per_s"],
        ratio(result["celery"]["ops_per_s"], base["ops_per_s"]),
        ">= 1.0x (stretch 2x)",
    )
    if "celery_reuse" in result:
        r = result["celery_reuse"]
        bench.row(
            "W1",
            f"Celery path, CELERY_DB_REUSE_MAX={reuse_max}, ops/s",
            r["ops_per_s"],
            base["ops_per_s"],
            ratio(r["ops_per_s"], base["ops_per_s"]),
            "(informative)",
        )
    bench.row(
        "W1",
        "DB worker x2, ops/s",
        result["db"]["ops_per_s"],
        base["ops_per_s"],
        ratio(result["db"]["ops_per_s"], base["ops_per_s"]),
        ">= 1,500 ops/s",
    )
    two = result["db"]["ops_per_s_all_workers"]
    bench.row(
        "W1",
        "  DB worker x2 while both run, ops/s",
        two,
        "",
        "",
        "(informative: start-up left out)",
    )
    for count in SCALING_DB_WORKERS:
        rate = result[f"db_x{count}"]["ops_per_s_all_workers"]
        bench.row(
            "W1",
            f"  DB worker x{count} while all run, ops/s (baseline: x2)",
            rate,
            two,
            ratio(rate, two),
            "(informative: scaling on 2 cores)",
        )
    for name in variants:
        r = result[name]
        bench.row(
            "W1",
            f"{name}: wall incl. start-up s (ops/s)",
            f"{r['wall_s']:.2f} ({r['ops_per_s_wall']:,.0f}/s)",
            "",
            "",
            f"start-up {r['startup_s']:.2f}s",
        )
    result["repeats"] = repeats
    result["spread_ops_per_s"] = {
        name: (statistics.pstdev(result[name]["all_ops_per_s"]) if repeats > 1 else 0.0)
        for name in variants
    }
    return result


TABLE = BatchOperation._meta.db_table
#: An empty copy of the operations table (columns, indexes, constraints but foreign keys: the
#: benchmark's operations reference no user or object), swapped in for the empty-table runs.
_EMPTY_TWIN = f"{TABLE}_empty_twin"
_HISTORY_ASIDE = f"{TABLE}_history_aside"


@contextlib.contextmanager
def _empty_table_in_place() -> Iterator[None]:
    """Swap the empty twin in for the operations table, and back (emptied) afterwards.

    Renames keep both tables' physical state, so the runs with history measure the very table
    the history run left behind, and runs on an empty table can alternate with them.
    """
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE {TABLE} RENAME TO {_HISTORY_ASIDE}")
        cursor.execute(f"ALTER TABLE {_EMPTY_TWIN} RENAME TO {TABLE}")
    try:
        yield
    finally:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(f"TRUNCATE {TABLE}")
            cursor.execute(f"ALTER TABLE {TABLE} RENAME TO {_EMPTY_TWIN}")
            cursor.execute(f"ALTER TABLE {_HISTORY_ASIDE} RENAME TO {TABLE}")


def w5_memory_and_scale(
    bench: Bench, *, n_history: int, n_w1: int, repeats: int = 3
) -> dict[str, Any]:
    """For each path: RSS over ``n_history`` operations, then W1 with those rows present and
    W1 on an empty table, ``repeats`` times each, alternating (empty first in even rounds), so
    that both medians share the machine's drift. The rows each W1 run adds are deleted (and
    vacuumed) before the next, so every run with history sees the same ``n_history`` rows."""
    result: dict[str, Any] = {}
    for transport, label in (("celery", "Celery node"), ("db", "DB workers x2")):
        bench.reset()
        with connection.cursor() as cursor:
            cursor.execute(f"DROP TABLE IF EXISTS {_EMPTY_TWIN}")
            cursor.execute(f"CREATE TABLE {_EMPTY_TWIN} (LIKE {TABLE} INCLUDING ALL)")
        memory = run_tracked(bench, transport=transport, n=n_history, sample_rss=True)
        # Each operation left a dead row version per update (claim, finish): measure the
        # steady state that autovacuum keeps, not the minute after a burst.
        with connection.cursor() as cursor:
            cursor.execute(f"VACUUM ANALYZE {TABLE}")
        history_end = BatchOperation.objects.aggregate(end=Max("pk"))["end"]
        empty_runs: list[dict[str, Any]] = []
        history_runs: list[dict[str, Any]] = []
        for round_ in range(repeats):
            for empty in (True, False) if round_ % 2 == 0 else (False, True):
                bench.redis.flushdb()
                if empty:
                    with _empty_table_in_place():
                        empty_runs.append(
                            run_tracked(bench, transport=transport, n=n_w1, analyze=True)
                        )
                    continue
                history_runs.append(run_tracked(bench, transport=transport, n=n_w1, analyze=True))
                with connection.cursor() as cursor:
                    cursor.execute(f"DELETE FROM {TABLE} WHERE id > %s", [history_end])
                    cursor.execute(f"VACUUM ANALYZE {TABLE}")
        empty, scaled = _median_run(empty_runs), _median_run(history_runs)
        result[transport] = {
            "memory_run": memory,
            "w1_empty": empty,
            "w1_with_history": scaled,
            "history_rows": n_history,
            "slowdown_ratio": ratio(scaled["ops_per_s"], empty["ops_per_s"]),
        }
        rss = memory["rss"]
        bench.row(
            "W5",
            f"{label}: RSS MiB at 10% -> end of {n_history:,} ops",
            f"{rss['at_10pct_kib'] / 1024:.1f} -> {rss['end_kib'] / 1024:.1f}",
            "",
            f"{rss['growth_pct']:+.1f}%",
            "growth < 10%",
        )
        bench.row("W5", f"{label}: ops/s over the {n_history:,} ops", memory["ops_per_s"])
        bench.row(
            "W5",
            f"{label}: W1 ops/s with {n_history:,} finished rows (median of {repeats})",
            scaled["ops_per_s"],
            empty["ops_per_s"],
            ratio(scaled["ops_per_s"], empty["ops_per_s"]),
            ">= 0.9x of empty table",
        )
    return result
