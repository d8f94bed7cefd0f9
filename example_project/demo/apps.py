"""The demo app: the ``demo`` and ``run_all`` management commands and their helpers."""

from django.apps import AppConfig


class DemoConfig(AppConfig):
    name = "demo"
