"""App configuration: discovers handler modules and connects checks and logging receivers."""

from __future__ import annotations

from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class BatchOperationAppConfig(AppConfig):
    name = "batchframework"
    label = "batchframework"
    verbose_name = _("Batch framework")
    default_auto_field = "django.db.models.BigAutoField"
    default = True

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the system checks)
        from .registry import autodiscover
        from .signals import connect_logging_receivers

        connect_logging_receivers()
        autodiscover()
