"""W4 queries: SQL statements on the hot path, counted with ``CaptureQueriesContext``.

Per operation: ``enqueue`` (inside ``atomic``), claim by id, finish. Per batch, at several
sizes (constant means O(1) per batch): ``claim_due``, the Celery ``run_operations`` message,
``drain``, the DB worker, the poller tick. And the seed's Game → Player → Card example.
Figures are SQL statements excluding BEGIN/COMMIT (which Django 6.0 also captures, and which
are round trips too: the JSON's ``sql`` lists every captured statement). Savepoints count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.contrib.contenttypes.models import ContentType
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from batchframework import enqueue, enqueue_many
from batchframework.conf import get_settings
from batchframework.engine import claim, claim_due, run_claimed
from batchframework.models import BatchOperation
from batchframework.worker import Worker
from batchframework_celery.poller import poll_once
from batchframework_celery.tasks import drain, run_operations

from .benchapp.models import Card, Game, Player
from .common import NULL_DISPATCHER, Bench, dispatcher

SIZES = (10, 100, 1000)


TRANSACTION_CONTROL = ("BEGIN", "COMMIT", "ROLLBACK")


def count(fn: Callable[[], Any]) -> tuple[int, list[str]]:
    """(statements other than BEGIN/COMMIT, every captured statement abbreviated)."""
    with CaptureQueriesContext(connection) as ctx:
        fn()
    sql = [q["sql"][:200] for q in ctx.captured_queries]
    return sum(1 for q in sql if q.strip().upper() not in TRANSACTION_CONTROL), sql


def _due(n: int) -> list[int]:
    return [op.pk for op in enqueue_many("bench-noop", [{}] * n)]


def seed_example(game: Game, n: int) -> None:
    """The seed's example as written there, from the fetched game on: create_syncronous,
    bulk_create the players, fetch them back by operation, bulk_create the cards, finish."""
    batchoperation = BatchOperation.objects.create_syncronous(context_object=game)
    players = [
        Player(game=game, name=f"player{i}", batchoperation=batchoperation) for i in range(n)
    ]
    Player.objects.bulk_create(players)
    created_players = Player.objects.filter(batchoperation=batchoperation)
    cards = [Card(player=player, cardid=i % 52) for i, player in enumerate(created_players)]
    Card.objects.bulk_create(cards)
    batchoperation.finish()


def w4_queries(bench: Bench) -> dict[str, Any]:
    batch = get_settings().BATCH_SIZE
    r: dict[str, Any] = {"batch_size": batch}
    sql: dict[str, list[str]] = {}
    bench.reset()
    with dispatcher(NULL_DISPATCHER):
        game = Game.objects.create(name="seed")

        def single() -> None:
            with transaction.atomic():
                enqueue("bench-noop")

        def with_context() -> None:
            with transaction.atomic():
                enqueue("bench-noop", context_object=game, input_data={"x": 1})

        with_context()  # warm the ContentType cache
        r["enqueue"], sql["enqueue"] = count(single)
        r["enqueue_with_context"], sql["enqueue_with_context"] = count(with_context)
        r["enqueue_many"] = {
            n: count(lambda n=n: enqueue_many("bench-noop", [{}] * n))[0] for n in SIZES
        }
        bench.reset()
        game = Game.objects.create(name="seed")

        [pk] = _due(1)
        claimed: list[Any] = []
        r["claim_by_id"], sql["claim_by_id"] = count(lambda: claimed.append(claim(pk)))
        r["finish"], sql["finish"] = count(lambda: run_claimed(claimed[0]))

        r["claim_due_per_batch"] = {}
        for n in (1, 10, batch):
            bench.reset()
            game = Game.objects.create(name="seed")
            _due(n)
            got: list[Any] = []
            r["claim_due_per_batch"][n], q = count(
                lambda n=n, got=got: got.extend(claim_due(limit=n))
            )
            assert len(got) == n, (len(got), n)
            sql[f"claim_due_{n}"] = q
        r["finish_each_of_batch"], _ = count(lambda: [run_claimed(op) for op in got])

        r["run_operations_message"] = {}
        for n in (1, 10, batch):
            bench.reset()
            ids = _due(n)
            r["run_operations_message"][n], q = count(lambda ids=ids: run_operations(ids))
            sql[f"run_operations_{n}"] = q
        bench.reset()
        _due(batch)
        r["drain_message"], sql["drain"] = count(lambda: drain("default"))

        r["db_worker"] = {}
        for n in SIZES:
            bench.reset()
            _due(n)
            r["db_worker"][n] = count(lambda: Worker(once=True).run())[0]

        r["poll_tick"] = {}
        for n in SIZES:
            bench.reset()
            _due(n)
            r["poll_tick"][n], sql[f"poll_{n}"] = count(poll_once)
        bench.reset()

        r["seed_example"] = {}
        for n in SIZES:
            bench.reset()
            game = Game.objects.create(name="seed")
            ContentType.objects.clear_cache()
            cold = count(lambda n=n, game=game: seed_example(game, n))
            warm = count(lambda n=n, game=game: seed_example(game, n))
            r["seed_example"][n] = {"cold_cache": cold[0], "warm_cache": warm[0]}
            sql[f"seed_{n}_warm"] = warm[1]
        bench.reset()
    r["sql"] = sql

    bench.row("W4", "enqueue (in atomic), statements", r["enqueue"], "", "", "1")
    bench.row("W4", "enqueue with context object + input", r["enqueue_with_context"], "", "", "1")
    bench.row(
        "W4",
        "enqueue_many n=10/100/1000, statements",
        " / ".join(str(r["enqueue_many"][n]) for n in SIZES),
        "",
        "",
        "O(n/1000)",
    )
    bench.row(
        "W4",
        "claim by id + finish, statements",
        f"{r['claim_by_id']} + {r['finish']}",
        "",
        "",
        "small constant",
    )
    bench.row(
        "W4",
        f"claim_due per batch of 1/10/{batch}",
        " / ".join(str(v) for v in r["claim_due_per_batch"].values()),
        "",
        "",
        "O(1)",
    )
    bench.row(
        "W4",
        f"finish each of a batch of {batch} (total)",
        r["finish_each_of_batch"],
        "",
        "",
        "O(1) per batch",
    )
    bench.row(
        "W4",
        f"run_operations message of 1/10/{batch} ids",
        " / ".join(str(v) for v in r["run_operations_message"].values()),
        "",
        "",
        "O(1) per message",
    )
    bench.row("W4", f"drain message ({batch} due)", r["drain_message"], "", "", "O(1)")
    bench.row(
        "W4",
        "DB worker, n=10/100/1000 ops, statements",
        " / ".join(f"{r['db_worker'][n]} ({r['db_worker'][n] / n:.2f}/op)" for n in SIZES),
        "",
        "",
        "O(n/batch)",
    )
    bench.row(
        "W4",
        "poll tick with 10/100/1000 due",
        " / ".join(str(r["poll_tick"][n]) for n in SIZES),
        "",
        "",
        "O(1)",
    )
    bench.row(
        "W4",
        "seed example N=10/100/1000 (warm / cold CT cache)",
        " / ".join(f"{v['warm_cache']}/{v['cold_cache']}" for v in r["seed_example"].values()),
        "",
        "",
        "<= 5",
    )
    return r
