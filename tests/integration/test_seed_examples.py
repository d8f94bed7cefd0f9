"""The two examples of the original ``ievv_batchframework`` documentation, run as tests.

The code is kept as close to the seed's text as possible; the import path is
``batchframework.models`` and the seed's ``Blog`` is ``tests.testapp.models.Post``.
"""

from __future__ import annotations

import math
import random
from datetime import timedelta

import pytest
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import FieldError
from django.db import connection
from django.db.models import Count
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from batchframework.engine import CancelOutcome
from batchframework.models import BatchOperation
from tests.testapp.models import Card, Game, Player, Post

pytestmark = pytest.mark.django_db


# --- Asynchronous operations. -----------------------------------------------------------------


def due_blogpost_emails(now=None):
    """The seed's polling query. The seed filters on ``started_datetime``, a field that
    neither the original nor this model has; the creation time is ``created_datetime``."""
    now = now or timezone.now()
    return BatchOperation.objects.filter(
        operationtype="new-blogpost-email",
        created_datetime__lt=now - timedelta(minutes=15),
    )


def my_batching_service(batchoperation_id):
    """The seed's batching service code."""
    batchoperation = BatchOperation.objects.get(id=batchoperation_id)
    batchoperation.status = BatchOperation.STATUS_RUNNING
    batchoperation.save()
    # ... send out the emails ...
    batchoperation.finish()


@pytest.mark.parametrize("context_argument", ["context_object_id", "context_object"])
def test_asynchronous_example(context_argument):
    myblogpost = Post.objects.create(title="My blog post")
    # The seed passes the post as context_object_id; context_object is the argument's name.
    BatchOperation.objects.create_asyncronous(
        **{context_argument: myblogpost}, operationtype="new-blogpost-email"
    )

    # Not yet 15 minutes old: the polling service does not see it.
    assert not due_blogpost_emails().exists()
    # 15 minutes later it does.
    found = list(due_blogpost_emails(now=timezone.now() + timedelta(minutes=16)))
    assert len(found) == 1
    batchoperation = found[0]
    assert batchoperation.context_object == myblogpost
    assert batchoperation.status == BatchOperation.STATUS_UNPROCESSED

    my_batching_service(batchoperation.id)

    batchoperation.refresh_from_db()
    assert batchoperation.status == BatchOperation.STATUS_FINISHED
    assert batchoperation.result == BatchOperation.RESULT_SUCCESSFUL
    assert batchoperation.started_running_datetime is not None
    assert batchoperation.started_running_datetime <= batchoperation.finished_datetime
    assert list(BatchOperation.objects.for_context_object(myblogpost)) == [batchoperation]


def test_the_seeds_started_datetime_filter_names_no_field():
    with pytest.raises(FieldError, match="started_datetime"):
        BatchOperation.objects.filter(
            operationtype="new-blogpost-email",
            started_datetime__lt=timezone.now() - timedelta(minutes=15),
        ).exists()


def test_deleting_a_pending_operation_cancels_it():
    myblogpost = Post.objects.create(title="My blog post")
    batchoperation = BatchOperation.objects.create_asyncronous(
        context_object=myblogpost, operationtype="new-blogpost-email"
    )
    # The user edited the blog post within 15 minutes.
    batchoperation.delete()
    assert not due_blogpost_emails(now=timezone.now() + timedelta(minutes=16)).exists()
    assert not BatchOperation.objects.for_context_object(myblogpost).exists()


def test_cancel_of_a_pending_operation():
    myblogpost = Post.objects.create(title="My blog post")
    batchoperation = BatchOperation.objects.create_asyncronous(
        context_object=myblogpost, operationtype="new-blogpost-email"
    )
    kept = BatchOperation.objects.create_asyncronous(
        context_object=myblogpost, operationtype="other"
    )

    assert batchoperation.cancel() is CancelOutcome.CANCELLED
    assert not BatchOperation.objects.filter(pk=batchoperation.pk).exists()
    assert not due_blogpost_emails(now=timezone.now() + timedelta(minutes=16)).exists()
    assert list(BatchOperation.objects.for_context_object(myblogpost)) == [kept]

    assert batchoperation.cancel() is CancelOutcome.NOT_FOUND
    assert not CancelOutcome.NOT_FOUND and CancelOutcome.CANCELLED


def test_cancel_of_a_running_operation_is_too_late_and_changes_nothing():
    myblogpost = Post.objects.create(title="My blog post")
    batchoperation = BatchOperation.objects.create_asyncronous(
        context_object=myblogpost, operationtype="new-blogpost-email"
    )
    batchoperation.mark_as_running()
    before = BatchOperation.objects.filter(pk=batchoperation.pk).values().get()

    assert batchoperation.cancel() is CancelOutcome.TOO_LATE_RUNNING

    assert BatchOperation.objects.filter(pk=batchoperation.pk).values().get() == before
    batchoperation.finish()
    assert batchoperation.cancel() is CancelOutcome.TOO_LATE_FINISHED
    assert BatchOperation.objects.get(pk=batchoperation.pk).result == "successful"


# --- Synchronous operations. ------------------------------------------------------------------


def expected_query_count(n_players: int) -> int:
    """INSERT op, INSERT players, SELECT players, INSERT cards, UPDATE finish: 5 when each
    bulk_create fits in one statement. A backend whose parameter limit splits a bulk insert
    (older SQLite builds: 999 variables) needs one INSERT per batch; compute that bound from
    the backend's own batch size rather than guess it."""
    ops = connection.ops
    player_fields = [f for f in Player._meta.concrete_fields if not f.primary_key]
    card_fields = [f for f in Card._meta.concrete_fields if not f.primary_key]
    players = [Player()] * n_players
    cards = [Card()] * n_players
    player_batches = math.ceil(n_players / max(ops.bulk_batch_size(player_fields, players), 1))
    card_batches = math.ceil(n_players / max(ops.bulk_batch_size(card_fields, cards), 1))
    return 3 + player_batches + card_batches


@pytest.mark.parametrize("n_players", [10, 100, 1000])
def test_synchronous_example(n_players):
    game = Game.objects.create(name="poker")
    # A process looks a content type up once and caches it; warm that cache so the count
    # below is the example's own queries.
    ContentType.objects.get_for_model(Game)
    available_cards = list(range(1, 53))  # A list of available card IDs

    with CaptureQueriesContext(connection) as queries:
        # game = Game.objects.get(...)  (created above)
        batchoperation = BatchOperation.objects.create_syncronous(context_object=game)

        players = []
        for index in range(n_players):
            player = Player(
                game=game,
                name="player{}".format(index),  # noqa: UP032 (the seed's text)
                batchoperation=batchoperation,
            )
            players.append(player)
        Player.objects.bulk_create(players)
        created_players = Player.objects.filter(batchoperation=batchoperation)

        cards = []
        for player in created_players:
            card = Card(player=player, cardid=random.choice(available_cards))
            cards.append(card)
        Card.objects.bulk_create(cards)
        batchoperation.finish()

    count = len(queries.captured_queries)
    assert count == expected_query_count(n_players)
    if connection.vendor != "sqlite" or expected_query_count(1000) == 5:
        # No batch splitting: the same 5 queries for 10, 100 or 1000 players.
        assert count == 5
    statements = [q["sql"].split()[0].upper() for q in queries.captured_queries]
    assert statements[0] == "INSERT" and statements[-1] == "UPDATE"
    assert statements.count("SELECT") == 1

    batchoperation.refresh_from_db()
    assert batchoperation.status == BatchOperation.STATUS_FINISHED
    assert batchoperation.result == BatchOperation.RESULT_SUCCESSFUL
    assert batchoperation.context_object == game

    game_players = Player.objects.filter(game=game)
    assert game_players.count() == n_players
    assert game_players.filter(batchoperation=batchoperation).count() == n_players
    assert game_players.annotate(n_cards=Count("card")).filter(n_cards=1).count() == n_players
    assert Card.objects.filter(player__game=game).count() == n_players
    assert set(Card.objects.filter(player__game=game).values_list("cardid", flat=True)) <= set(
        available_cards
    )
    assert set(game_players.values_list("name", flat=True)) == {
        f"player{index}" for index in range(n_players)
    }
