"""Settings for the reliability suite's subprocesses (Celery workers, pollers, DB workers).

The tests' settings with the Celery dispatcher switched on and short timings taken from the
environment, so a test gives its subprocesses the same timings it uses itself:

``BF_POLL_INTERVAL``, ``BF_DEFAULT_LEASE``, ``BF_DISPATCH_HORIZON`` (seconds) and
``BF_VISIBILITY_TIMEOUT``, ``BF_RESTORE_INTERVAL`` (the Redis transport's visibility timeout
and how often a worker sweeps for messages that outlived it), ``BF_DB_REUSE_MAX`` (set: the
connection reuse docs/celery.rst recommends for workers). ``DATABASE_URL`` must name the
test database pytest-django created; ``CELERY_BROKER_URL`` names the test's private Redis.
"""

import os

from tests.settings import *  # noqa: F403
from tests.settings import BATCHFRAMEWORK as _BASE
from tests.settings import CELERY_BROKER_TRANSPORT_OPTIONS as _TRANSPORT


def _seconds(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


BATCHFRAMEWORK = {
    **_BASE,
    "DISPATCHER": "batchframework_celery.dispatcher.CeleryDispatcher",
    "POLL_INTERVAL": _seconds("BF_POLL_INTERVAL", 1),
    "DEFAULT_LEASE": _seconds("BF_DEFAULT_LEASE", 30),
    "DISPATCH_HORIZON": _seconds("BF_DISPATCH_HORIZON", 10),
}

CELERY_BROKER_TRANSPORT_OPTIONS = {
    **_TRANSPORT,
    "visibility_timeout": _seconds("BF_VISIBILITY_TIMEOUT", 60),
    "unacked_restore_interval": _seconds("BF_RESTORE_INTERVAL", 10),
    "unacked_restore_throttle": 1,
}
if os.environ.get("BF_DB_REUSE_MAX"):
    CELERY_DB_REUSE_MAX = int(float(os.environ["BF_DB_REUSE_MAX"]))
    DATABASES["default"] = {  # noqa: F405
        **DATABASES["default"],  # noqa: F405
        "CONN_MAX_AGE": 600,
        "CONN_HEALTH_CHECKS": True,
    }

# Celery's soft shutdown: a cold shutdown (SIGQUIT) waits this long for the tasks in hand.
if os.environ.get("BF_SOFT_SHUTDOWN_TIMEOUT"):
    CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT = _seconds("BF_SOFT_SHUTDOWN_TIMEOUT", 0)

# Workers reconnect quickly after a broker restart.
CELERY_BROKER_CONNECTION_RETRY = True
CELERY_BROKER_CONNECTION_MAX_RETRIES = None

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(process)d %(levelname)s %(name)s %(message)s"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {"batchframework": {"handlers": ["console"], "level": "INFO", "propagate": False}},
}
