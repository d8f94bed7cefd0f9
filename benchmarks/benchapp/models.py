"""The seed's synchronous bulk example: a Game has Players, each Player gets a Card."""

from django.db import models


class Game(models.Model):
    name = models.CharField(max_length=100)

    def __str__(self) -> str:
        return self.name


class Player(models.Model):
    game = models.ForeignKey(Game, on_delete=models.CASCADE)
    name = models.CharField(max_length=100)
    batchoperation = models.ForeignKey(
        "batchframework.BatchOperation", null=True, on_delete=models.SET_NULL
    )

    def __str__(self) -> str:
        return self.name


class Card(models.Model):
    player = models.ForeignKey(Player, on_delete=models.CASCADE)
    cardid = models.IntegerField()

    def __str__(self) -> str:
        return f"card {self.cardid}"
