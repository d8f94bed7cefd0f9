"""The seed's bulk example: a constant number of queries, and the background deal's progress."""

import math

from django.contrib.auth import get_user_model
from django.db import connection
from django.test import TestCase, override_settings
from django.urls import reverse

from batchframework import BatchOperation
from batchframework.testing import run_due

from .batch_handlers import DEAL_IN_BACKGROUND
from .models import Card, Game, Player
from .services import measure_deal


@override_settings(BATCHFRAMEWORK={"DISPATCHER": "batchframework.dispatch.NullDispatcher"})
class DealTests(TestCase):
    def test_synchronous_deal_takes_five_queries_whatever_the_number_of_players(self):
        for players in (10, 300):
            game = Game.objects.create(name=f"{players}")
            deal = measure_deal(game, players)
            self.assertEqual(deal.queries, 5, deal.statements)
            self.assertEqual(deal.operation.result, BatchOperation.RESULT_SUCCESSFUL)
            self.assertEqual(Player.objects.filter(game=game).count(), players)
            self.assertEqual(Card.objects.filter(player__game=game).count(), players)

    def test_a_larger_deal_adds_only_the_insert_batches_the_database_needs(self):
        players = 1000
        game = Game.objects.create(name="large")
        deal = measure_deal(game, players)

        def batches(model, names):
            fields = [model._meta.get_field(name) for name in names]
            return math.ceil(players / connection.ops.bulk_batch_size(fields, [None] * players))

        inserts = batches(Player, ("game", "name", "batchoperation"))
        inserts += batches(Card, ("player", "cardid"))
        self.assertEqual(deal.queries, 3 + inserts, deal.statements)

    def test_views_start_a_game_and_a_background_deal(self):
        user = get_user_model().objects.create_user("player", password="pw")
        self.client.force_login(user)
        response = self.client.post(
            reverse("game:game_create"), {"name": "G", "players": 20}, follow=True
        )
        self.assertContains(response, "in 5 queries")
        game = Game.objects.get(name="G")
        response = self.client.post(
            reverse("game:deal_in_background", args=[game.pk]),
            {"players": 120, "delay_seconds": 0, "chunk": 50, "pause": 0},
        )
        self.assertEqual(response.status_code, 302)
        (operation,) = run_due()
        operation.refresh_from_db()
        self.assertEqual((operation.progress_done, operation.progress_total), (120, 120))
        self.assertEqual(operation.output_data, {"players": 120, "cards": 120})
        self.assertEqual(game.players.count(), 140)

    def test_an_invalid_background_deal_shows_the_game_again_with_its_errors(self):
        user = get_user_model().objects.create_user("player", password="pw")
        self.client.force_login(user)
        self.client.post(reverse("game:game_create"), {"name": "G", "players": 20})
        game = Game.objects.get(name="G")
        response = self.client.post(
            reverse("game:deal_in_background", args=[game.pk]), {"players": -1}
        )
        self.assertEqual(response.status_code, 400)
        self.assertContains(response, "20 players.", status_code=400)
        self.assertFalse(BatchOperation.objects.filter(operationtype=DEAL_IN_BACKGROUND).exists())
