"""Settings for the test suite. ``DATABASE_URL`` picks the database (SQLite by default)."""

from __future__ import annotations

import hashlib
import os
import tempfile

import dj_database_url

SECRET_KEY = "tests-only-not-secret"
USE_TZ = True
TIME_ZONE = "Europe/Oslo"
DEBUG = False

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.admin",
    "django_celery_beat",
    "batchframework",
    "batchframework_celery",
    "tests.testapp",
]

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "tests.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

# One file per checkout: Django's test runner deletes the test database it finds at the start,
# so two checkouts' runs sharing one would delete it under each other.
_checkout = hashlib.sha256(os.path.dirname(os.path.dirname(os.path.abspath(__file__))).encode())
_default_sqlite = os.path.join(
    tempfile.gettempdir(), f"batchframework-tests-{_checkout.hexdigest()[:8]}.sqlite3"
)
DATABASE_URL = os.environ.get("DATABASE_URL") or f"sqlite:///{_default_sqlite}"
DATABASES = {"default": dj_database_url.parse(DATABASE_URL)}
_engine = DATABASES["default"]["ENGINE"]
if _engine.endswith("sqlite3"):
    # A file (not :memory:) so subprocess tests share it; IMMEDIATE so concurrent writers
    # queue on the lock instead of failing a lock upgrade.
    DATABASES["default"]["OPTIONS"] = {"transaction_mode": "IMMEDIATE", "timeout": 30}
    # Beside the configured file, so that runs with different DATABASE_URLs never share one.
    _name = str(DATABASES["default"]["NAME"]).removesuffix(".sqlite3")
    DATABASES["default"]["TEST"] = {"NAME": f"{_name}-test.sqlite3"}
elif _engine.endswith("mysql"):
    DATABASES["default"].setdefault("OPTIONS", {})["charset"] = "utf8mb4"
    DATABASES["default"]["TEST"] = {"CHARSET": "utf8mb4", "COLLATION": "utf8mb4_unicode_ci"}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

BATCHFRAMEWORK = {
    "DEFAULT_RETRY_BACKOFF": 0,
    # Most tests don't want a broker; Celery tests switch to the Celery dispatcher.
    "DISPATCHER": "batchframework.dispatch.NullDispatcher",
    "POLL_INTERVAL": 1,
    "DISPATCH_HORIZON": 10,
}

# Celery, configured the standard way (see tests/celery_app.py). Redis DB 15 keeps the tests'
# queues apart from anything else on the machine.
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/15")
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_TASK_IGNORE_RESULT = True
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": 60,
    "socket_connect_timeout": 1,
    "socket_timeout": 2,
}
CELERY_BROKER_CONNECTION_TIMEOUT = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"batchframework": {"handlers": ["console"], "level": "WARNING"}},
}
