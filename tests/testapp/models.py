"""Models the tests use: the seed's Game → Player → Card, context objects with int, UUID and
string primary keys, and an effect table whose unique constraint counts handler runs."""

import uuid

from django.contrib.contenttypes.fields import GenericRelation
from django.db import models

from batchframework.models import BatchOperation


class Game(models.Model):
    name = models.CharField(max_length=100, default="game")


class Player(models.Model):
    game = models.ForeignKey(Game, on_delete=models.CASCADE)
    name = models.CharField(max_length=100)
    batchoperation = models.ForeignKey(
        BatchOperation, null=True, on_delete=models.SET_NULL, related_name="+"
    )


class Card(models.Model):
    player = models.ForeignKey(Player, on_delete=models.CASCADE)
    cardid = models.IntegerField()


class Post(models.Model):
    title = models.CharField(max_length=100)


class UUIDThing(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4)


class StringThing(models.Model):
    slug = models.CharField(max_length=50, primary_key=True)


class Effect(models.Model):
    """One row per handler execution that must happen once: the unique key catches doubles."""

    key = models.CharField(max_length=100, unique=True)


class Execution(models.Model):
    """One row per handler call, duplicates allowed: counts how often a handler ran."""

    key = models.CharField(max_length=100, db_index=True)


class OperationLine(models.Model):
    """A row that belongs to its operation (``CASCADE``): deleting the operation deletes it."""

    batchoperation = models.ForeignKey(BatchOperation, on_delete=models.CASCADE, related_name="+")


class ProtectingLine(models.Model):
    """A row that keeps its operation from being deleted (``PROTECT``)."""

    batchoperation = models.ForeignKey(BatchOperation, on_delete=models.PROTECT, related_name="+")


class Archive(models.Model):
    """A model whose operations are deleted with it (a ``GenericRelation`` cascades), as a
    project may declare to query an object's operations."""

    title = models.CharField(max_length=100)
    operations = GenericRelation(
        BatchOperation,
        content_type_field="context_content_type",
        object_id_field="context_object_id",
    )
