"""Dealing starting cards: the seed's bulk example, in a constant number of queries.

A synchronous ``BatchOperation`` gives the deal a unique id; the players are bulk-created
tagged with it, fetched back by it, and their cards bulk-created: five queries for any number
of players, plus one INSERT per extra batch on databases that cap the parameters of a
statement (Django splits a ``bulk_create`` of more than 999 parameters on SQLite before 6.0).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

from django.contrib.contenttypes.models import ContentType
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from batchframework import BatchOperation

from .models import Card, Game, Player

DEAL_OPERATIONTYPE = "deal-starting-cards"
AVAILABLE_CARDS: Sequence[int] = range(1, 53)


def add_players_with_cards(
    game: Game, operation: BatchOperation, names: Sequence[str], rng: random.Random
) -> int:
    """Bulk-create ``names`` as players tagged with ``operation``, then one card each.
    Three queries (two inserts and one select). Returns how many players were made."""
    Player.objects.bulk_create(
        [Player(game=game, name=name, batchoperation=operation) for name in names]
    )
    # The operation's players that have no card yet: exactly the ones just created, also when
    # a background deal adds its players chunk by chunk.
    created = Player.objects.filter(batchoperation=operation, cards__isnull=True).only("pk")
    Card.objects.bulk_create(
        [Card(player=player, cardid=rng.choice(AVAILABLE_CARDS)) for player in created]
    )
    return len(names)


def deal_starting_cards(
    game: Game, player_count: int, *, seed: int | None = None
) -> BatchOperation:
    """Create ``player_count`` players, each with one random card, as one synchronous operation
    (finished as failed, with nothing half-made, if anything goes wrong)."""
    rng = random.Random(seed)
    names = [f"player{index}" for index in range(player_count)]
    with BatchOperation.objects.synchronous(
        context_object=game, operationtype=DEAL_OPERATIONTYPE, input_data={"players": player_count}
    ) as operation:
        with transaction.atomic():
            add_players_with_cards(game, operation, names, rng)
        operation.finish(output_data={"players": player_count, "cards": player_count})
    return operation


#: Statements that only delimit the transaction (SQLite's IMMEDIATE mode sends BEGIN through
#: the cursor, so it is captured there and not on PostgreSQL): not counted as queries.
TRANSACTION_CONTROL = frozenset({"BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE"})


@dataclasses.dataclass(frozen=True)
class MeasuredDeal:
    operation: BatchOperation
    #: The data queries, by their first keyword (INSERT, SELECT, UPDATE …), in order.
    statements: list[str]

    @property
    def queries(self) -> int:
        return len(self.statements)


def measure_deal(game: Game, player_count: int, *, seed: int | None = None) -> MeasuredDeal:
    """Deal and count the queries. The generic foreign key's content type is looked up once per
    process and then cached by Django; that lookup happens first, so the figure is the cost of
    a deal, not of a cold cache."""
    ContentType.objects.get_for_model(Game)
    with CaptureQueriesContext(connection) as captured:
        operation = deal_starting_cards(game, player_count, seed=seed)
    keywords = [query["sql"].split(None, 1)[0].upper() for query in captured.captured_queries]
    statements = [keyword for keyword in keywords if keyword not in TRANSACTION_CONTROL]
    return MeasuredDeal(operation=operation, statements=statements)
