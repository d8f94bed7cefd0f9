"""The project's Celery app, configured the standard way: every ``CELERY_*`` Django setting
configures it, and each installed app's ``tasks`` module (batchframework_celery's included) is
discovered. Start a worker with ``celery -A exampleproject worker`` from ``example_project/``."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "exampleproject.settings")

app = Celery("exampleproject")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
