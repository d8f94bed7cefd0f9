"""Games, players and cards. Players carry the ``BatchOperation`` that created them, so rows
made with ``bulk_create`` (which returns no primary keys on some databases) can be fetched
back with one query."""

from django.db import models
from django.urls import reverse

from batchframework import BatchOperation


class Game(models.Model):
    name = models.CharField(max_length=100)
    created_datetime = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_datetime", "-id"]

    def __str__(self) -> str:
        return self.name

    def get_absolute_url(self) -> str:
        return reverse("game:game_detail", args=[self.pk])


class Player(models.Model):
    game = models.ForeignKey(Game, on_delete=models.CASCADE, related_name="players")
    name = models.CharField(max_length=100)
    batchoperation = models.ForeignKey(
        BatchOperation, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    def __str__(self) -> str:
        return self.name


class Card(models.Model):
    player = models.ForeignKey(Player, on_delete=models.CASCADE, related_name="cards")
    cardid = models.PositiveSmallIntegerField()

    def __str__(self) -> str:
        return f"card {self.cardid} of {self.player}"
