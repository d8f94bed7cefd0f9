"""The operations pages: what a signed-in user's batch operations are doing."""

from django.apps import AppConfig


class OperationsConfig(AppConfig):
    name = "operations"
