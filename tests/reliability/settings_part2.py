"""Settings of the reliability suite's (part 2) subprocesses: workers, beats, scripts.

The tests' settings plus the ``poisonapp`` handlers, timings from the environment, INFO logs
from batchframework, and an optional simulated clock skew (``BF_CLOCK_SKEW_SECONDS``) that
moves ``django.utils.timezone.now`` of this process only, as if its clock were wrong.
``DATABASE_URL`` (read by ``tests.settings``) names the database; ``CELERY_BROKER_URL`` the
broker; ``BF_DISPATCHER`` the dispatcher (``celery`` for the Celery dispatcher).
"""

import os

from tests.settings import *  # noqa: F403
from tests.settings import BATCHFRAMEWORK as _BASE
from tests.settings import INSTALLED_APPS as _APPS

INSTALLED_APPS = [*_APPS, "tests.reliability.poisonapp"]

_DISPATCHERS = {
    "celery": "batchframework_celery.dispatcher.CeleryDispatcher",
    "null": "batchframework.dispatch.NullDispatcher",
}
BATCHFRAMEWORK = {
    **_BASE,
    "DISPATCHER": _DISPATCHERS[os.environ.get("BF_DISPATCHER", "null")],
    "POLL_INTERVAL": float(os.environ.get("BF_POLL_INTERVAL", _BASE["POLL_INTERVAL"])),
    "DISPATCH_HORIZON": float(os.environ.get("BF_DISPATCH_HORIZON", _BASE["DISPATCH_HORIZON"])),
    "BATCH_SIZE": int(os.environ.get("BF_BATCH_SIZE", "50")),
    "DEFAULT_LEASE": float(os.environ.get("BF_DEFAULT_LEASE", "300")),
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"batchframework": {"handlers": ["console"], "level": "INFO"}},
}

_SKEW = float(os.environ.get("BF_CLOCK_SKEW_SECONDS", "0") or 0)
if _SKEW:
    from datetime import timedelta as _timedelta

    from django.utils import timezone as _timezone

    _real_now = _timezone.now

    def _skewed_now():
        return _real_now() + _timedelta(seconds=_SKEW)

    _timezone.now = _skewed_now
