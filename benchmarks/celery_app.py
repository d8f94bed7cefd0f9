"""The benchmarks' Celery app, configured the way a user's project configures its own.

It also tells the harness when a worker is ready to consume (a Redis key with the time),
so that start-up time can be reported separately from processing time.
"""

import os
import time

from celery import Celery
from celery.signals import worker_ready

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.settings")

app = Celery("benchmarks")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

READY_KEY = "bench:worker-ready"


@worker_ready.connect
def _announce_ready(sender=None, **kwargs):
    from benchmarks.benchapp.tasks import client

    client().set(f"{READY_KEY}:{os.environ.get('BENCH_WORKER_TAG', '')}", time.time())
