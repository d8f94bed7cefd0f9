"""The game app: the seed's Game → Player → Card bulk example, synchronous and in the background."""

from django.apps import AppConfig


class GameConfig(AppConfig):
    name = "game"
    default_auto_field = "django.db.models.BigAutoField"
