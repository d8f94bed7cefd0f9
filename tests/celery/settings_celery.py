"""Settings for the ``celery worker`` and ``celery beat`` subprocesses of the Celery tests.

The tests' settings, with the Celery dispatcher switched on (``BF_DISPATCHER`` picks another)
and the timings taken from the environment, so a test can give its subprocesses the same
horizon and poll interval it uses itself. ``DATABASE_URL`` (read by ``tests.settings``) must
name the test database that pytest-django created; ``CELERY_BROKER_URL`` picks the broker.
"""

import os

from tests.settings import *  # noqa: F403
from tests.settings import BATCHFRAMEWORK as _BASE

BATCHFRAMEWORK = {
    **_BASE,
    "DISPATCHER": os.environ.get(
        "BF_DISPATCHER", "batchframework_celery.dispatcher.CeleryDispatcher"
    ),
    "POLL_INTERVAL": float(os.environ.get("BF_POLL_INTERVAL", _BASE["POLL_INTERVAL"])),
    "DISPATCH_HORIZON": float(os.environ.get("BF_DISPATCH_HORIZON", _BASE["DISPATCH_HORIZON"])),
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"batchframework": {"handlers": ["console"], "level": "INFO"}},
}
