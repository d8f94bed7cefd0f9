"""The blog app: posts whose notification email is a delayed, cancellable batch operation."""

from django.apps import AppConfig


class BlogConfig(AppConfig):
    name = "blog"
    default_auto_field = "django.db.models.BigAutoField"
