"""Django settings for the benchmark suite.

Everything here is a default or a documented tuning knob a user would set:

- ``DATABASE_URL`` (environment) picks the database; ``benchmarks.run`` points it at a fresh
  database it creates and drops. PostgreSQL by default.
- ``CONN_MAX_AGE`` / ``CONN_HEALTH_CHECKS`` (Django): keep connections between requests and
  check them before reuse. The DB-polling worker holds one connection for its whole life
  anyway. Celery 5.7's Django fixup ignores ``CONN_MAX_AGE``: it calls ``connection.close()``
  before and after every task (celery#9824 reverted the ``close_if_unusable_or_obsolete``
  behaviour) unless ``CELERY_DB_REUSE_MAX`` is set, so a tracked task reconnects once per
  *message*. ``BENCH_CELERY_DB_REUSE_MAX`` (environment) sets that knob for a comparison run.
- ``BATCHFRAMEWORK``: ``POLL_INTERVAL`` and ``DISPATCH_HORIZON`` (documented knobs) are
  shortened so that the lateness workload exercises the poller path within seconds;
  ``BATCH_SIZE`` stays at its default unless ``BENCH_BATCH_SIZE`` is set.
- Celery: Redis DB 13, JSON only, no result backend, the library's default queue name.
"""

from __future__ import annotations

import os

import dj_database_url

SECRET_KEY = "benchmarks-only-not-secret"
USE_TZ = True
TIME_ZONE = "UTC"
DEBUG = False  # DEBUG=True would record every query in memory (and skew W5's RSS).
ALLOWED_HOSTS: list[str] = []

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "batchframework",
    "batchframework_celery",
    "benchmarks.benchapp",
]

DATABASE_URL = os.environ.get(
    "DATABASE_URL", "postgres://postgres@127.0.0.1:5432/batchframework_bench"
)
DATABASES = {
    "default": dj_database_url.parse(DATABASE_URL, conn_max_age=600, conn_health_checks=True)
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

BATCHFRAMEWORK: dict[str, object] = {
    "POLL_INTERVAL": 1,
    "DISPATCH_HORIZON": 5,
}
if os.environ.get("BENCH_BATCH_SIZE"):
    BATCHFRAMEWORK["BATCH_SIZE"] = int(os.environ["BENCH_BATCH_SIZE"])

CELERY_BROKER_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_DEFAULT_QUEUE = "default"  # the library's DEFAULT_QUEUE: one queue for all
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
if os.environ.get("BENCH_CELERY_DB_REUSE_MAX"):
    CELERY_DB_REUSE_MAX = int(os.environ["BENCH_CELERY_DB_REUSE_MAX"])

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"batchframework": {"handlers": ["console"], "level": "WARNING"}},
}
