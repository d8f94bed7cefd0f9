"""W3 enqueue rate: ``enqueue`` one at a time, each in its own ``transaction.atomic()`` (as a
view does), against plain ``task.delay()``; and ``enqueue_many`` of 10,000.

With the Celery dispatcher, the tracked figure includes the INSERT, the commit and the publish
after commit; the "DB only" row (NullDispatcher, a DB-polling deployment) separates the two.
With RelayDispatcher the INSERT carries a NOTIFY and a worker's relay publishes: the caller's
cost is what is measured here (no worker runs, so nobody hears the announcements).
A last pair puts both in a view that writes a row of its own: ``delay()`` on commit against
``enqueue`` in the view's transaction, i.e. what tracking adds where a view already commits.
No worker runs: messages pile up in Redis DB 13 and are flushed afterwards. Rounds alternate
between the variants so that they share the machine's noise.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.test import override_settings

from batchframework import BatchOperation, enqueue, enqueue_many

from .common import NULL_DISPATCHER, RELAY_DISPATCHER, Bench, Timer, dispatcher, ratio

ROUNDS = 3


def _single_enqueues(n: int) -> float:
    with Timer() as t:
        for _ in range(n):
            with transaction.atomic():
                enqueue("bench-noop")
    return t.seconds


def _bare_inserts(n: int) -> float:
    """The floor under ``enqueue``: an INSERT of the same row and a durable COMMIT, as raw SQL
    through Django's cursor, with none of the library's code."""
    fields = [f for f in BatchOperation._meta.concrete_fields if not f.primary_key]
    row = BatchOperation.objects.values_list(*(f.attname for f in fields)).first()
    table = BatchOperation._meta.db_table
    sql = (
        f"INSERT INTO {table} ({', '.join(f.column for f in fields)}) "
        f"VALUES ({', '.join(['%s'] * len(fields))}) RETURNING id"
    )
    with Timer() as t:
        for _ in range(n):
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute(sql, row)
                cursor.fetchone()
    return t.seconds


def _plain_delays(n: int) -> float:
    from .benchapp.tasks import bench_incr

    with Timer() as t:
        for _ in range(n):
            bench_incr.delay("bench:w3", n)
    return t.seconds


def _views_delaying(n: int) -> float:
    """An untracked view: it writes a row and sends a plain task once that commits (sent any
    earlier, the task could run before the row exists, or for a row a rollback removed)."""
    from .benchapp.models import Game
    from .benchapp.tasks import bench_incr

    with Timer() as t:
        for _ in range(n):
            with transaction.atomic():
                Game.objects.create(name="view")
                transaction.on_commit(lambda: bench_incr.delay("bench:w3:view", n))
    return t.seconds


def _views_enqueuing(n: int) -> float:
    """The same view, tracked: it writes the row and enqueues in the same transaction."""
    from .benchapp.models import Game

    with Timer() as t:
        for _ in range(n):
            with transaction.atomic():
                Game.objects.create(name="view")
                enqueue("bench-noop")
    return t.seconds


def _drain_background_publishing() -> None:
    from batchframework_celery.publish import bounded_publishing

    bounded_publishing.drain()


def w3_enqueue(bench: Bench, *, n_single: int, n_many: int) -> dict[str, Any]:
    bench.reset()
    # Warm up: connections to PostgreSQL and Redis, the producer pool, ContentType cache.
    _plain_delays(20)
    _single_enqueues(20)
    _views_delaying(20)
    _views_enqueuing(20)
    totals = {
        "delay": 0.0,
        "enqueue": 0.0,
        "enqueue_background": 0.0,
        "enqueue_relay": 0.0,
        "enqueue_db_only": 0.0,
        "bare_insert_commit": 0.0,
        "view_delay": 0.0,
        "view_enqueue": 0.0,
        "view_enqueue_background": 0.0,
        "view_enqueue_relay": 0.0,
    }
    background = {**settings.BATCHFRAMEWORK, "PUBLISH_IN_BACKGROUND": True}
    per_round = n_single // ROUNDS
    for _ in range(ROUNDS):
        totals["delay"] += _plain_delays(per_round)
        totals["enqueue"] += _single_enqueues(per_round)
        with override_settings(BATCHFRAMEWORK=background):
            totals["enqueue_background"] += _single_enqueues(per_round)
            _drain_background_publishing()
        with dispatcher(RELAY_DISPATCHER):
            totals["enqueue_relay"] += _single_enqueues(per_round)
        with dispatcher(NULL_DISPATCHER):
            totals["enqueue_db_only"] += _single_enqueues(per_round)
        totals["bare_insert_commit"] += _bare_inserts(per_round)
        totals["view_delay"] += _views_delaying(per_round)
        totals["view_enqueue"] += _views_enqueuing(per_round)
        with override_settings(BATCHFRAMEWORK=background):
            totals["view_enqueue_background"] += _views_enqueuing(per_round)
            _drain_background_publishing()
        with dispatcher(RELAY_DISPATCHER):
            totals["view_enqueue_relay"] += _views_enqueuing(per_round)
        bench.reset()
    rates = {name: per_round * ROUNDS / seconds for name, seconds in totals.items()}
    many: dict[str, float] = {}
    for name, path in (("enqueue_many", None), ("enqueue_many_db_only", NULL_DISPATCHER)):
        with dispatcher(path), Timer() as t:
            enqueue_many("bench-noop", [{}] * n_many)
        many[name] = n_many / t.seconds
        bench.reset()
    result = {"n_single": per_round * ROUNDS, "n_many": n_many, "rates_per_s": {**rates, **many}}
    base = rates["delay"]
    bench.row("W3", "plain delay(), ops/s", base)
    bench.row(
        "W3",
        "enqueue in atomic (Celery dispatch), ops/s",
        rates["enqueue"],
        base,
        ratio(rates["enqueue"], base),
        ">= 0.8x",
    )
    bench.row(
        "W3",
        "  same, PUBLISH_IN_BACKGROUND=True, ops/s",
        rates["enqueue_background"],
        base,
        ratio(rates["enqueue_background"], base),
        ">= 0.8x (tuning knob)",
    )
    bench.row(
        "W3",
        "  same, RelayDispatcher (a worker publishes), ops/s",
        rates["enqueue_relay"],
        base,
        ratio(rates["enqueue_relay"], base),
        ">= 0.8x (tuning knob)",
    )
    bench.row(
        "W3",
        "enqueue in atomic (DB only), ops/s",
        rates["enqueue_db_only"],
        base,
        ratio(rates["enqueue_db_only"], base),
        "(informative)",
    )
    bench.row(
        "W3",
        "  floor: bare INSERT + COMMIT through Django, ops/s",
        rates["bare_insert_commit"],
        base,
        ratio(rates["bare_insert_commit"], base),
        "(informative: no library code)",
    )
    bench.row(
        "W3", "a view that writes a row, then delay() on commit, views/s", rates["view_delay"]
    )
    bench.row(
        "W3",
        "  the same view with enqueue instead (Celery dispatch), views/s",
        rates["view_enqueue"],
        rates["view_delay"],
        ratio(rates["view_enqueue"], rates["view_delay"]),
        "(informative: what tracking adds to a view)",
    )
    for name, label in (
        ("view_enqueue_background", "PUBLISH_IN_BACKGROUND=True"),
        ("view_enqueue_relay", "RelayDispatcher"),
    ):
        bench.row(
            "W3",
            f"    same, {label}, views/s",
            rates[name],
            rates["view_delay"],
            ratio(rates[name], rates["view_delay"]),
            "(informative)",
        )
    bench.row(
        "W3",
        f"enqueue_many {n_many:,} (Celery dispatch), ops/s",
        many["enqueue_many"],
        base,
        ratio(many["enqueue_many"], base),
        ">= 20,000 ops/s",
    )
    bench.row(
        "W3",
        f"enqueue_many {n_many:,} (DB only), ops/s",
        many["enqueue_many_db_only"],
        base,
        ratio(many["enqueue_many_db_only"], base),
        "(informative)",
    )
    return result
