"""``manage.py deal_cards --players N``: the seed's bulk example from the command line,
printing how many queries the deal took."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from game.models import Game
from game.services import measure_deal


class Command(BaseCommand):
    help = "Start a game and deal N players one card each, in a constant number of queries."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--players", type=int, default=1000)
        parser.add_argument("--name", default="Command-line game")

    def handle(self, *args: Any, **options: Any) -> None:
        game = Game.objects.create(name=options["name"])
        deal = measure_deal(game, options["players"])
        self.stdout.write(
            f"Operation #{deal.operation.pk} ({deal.operation.result}): "
            f"{options['players']} players "
            f"and cards in {deal.queries} queries: {', '.join(deal.statements)}"
        )
