"""Settings of the example project, read from the environment with embedded defaults.

With nothing set it runs on a SQLite file and kombu's filesystem broker under ``var/`` (no
server needed). Set ``DATABASE_URL`` (e.g. ``postgres://…``) and ``CELERY_BROKER_URL`` (e.g.
``redis://…``) to run on the real stack. Every variable read here:

``DATABASE_URL``, ``CELERY_BROKER_URL``, ``EXAMPLE_VAR_DIR`` (where SQLite, the embedded
broker's folders and file emails live), ``BLOG_NOTIFICATION_DELAY`` (seconds),
``BATCHFRAMEWORK_DISPATCH_HORIZON`` and ``BATCHFRAMEWORK_POLL_INTERVAL`` (seconds),
``EMAIL_BACKEND``, ``CELERY_BROKER_KEY_PREFIX`` (Redis only: keeps several runs on one Redis
database apart), ``DJANGO_DEBUG``, ``DJANGO_SECRET_KEY``, ``DJANGO_ALLOWED_HOSTS``,
``DJANGO_LOG_LEVEL``.
"""

from __future__ import annotations

import os
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("EXAMPLE_VAR_DIR") or BASE_DIR / "var").resolve()
VAR_DIR.mkdir(parents=True, exist_ok=True)


def env_seconds(name: str, default: float) -> float:
    """A number of seconds from the environment variable ``name``."""
    return float(os.environ.get(name) or default)


DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
# The default key is only good for a local example; docker-compose and production set their own.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-project-not-a-secret")
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "localhost,127.0.0.1,testserver").split(",")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_celery_beat",
    "batchframework",
    "batchframework_celery",
    "blog",
    "game",
    "operations",
    "demo",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "exampleproject.urls"
WSGI_APPLICATION = "exampleproject.wsgi.application"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
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

# --- Database -----------------------------------------------------------------------------------
DATABASE_URL = os.environ.get("DATABASE_URL") or f"sqlite:///{VAR_DIR / 'db.sqlite3'}"
# Persistent connections with health checks on servers; a worker's connection is checked
# before each task, so a restarted database costs one reconnect, not a failed task.
DATABASES = {
    "default": dj_database_url.parse(DATABASE_URL, conn_max_age=60, conn_health_checks=True)
}
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # The web, worker and beat processes share the file: IMMEDIATE transactions queue on the
    # write lock (instead of failing a lock upgrade) and wait up to 30 s for it.
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"]["OPTIONS"] = {"transaction_mode": "IMMEDIATE", "timeout": 30}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS: list[dict[str, str]] = []
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "operations:list"
LOGOUT_REDIRECT_URL = "blog:post_list"

USE_TZ = True
TIME_ZONE = "UTC"
LANGUAGE_CODE = "en-us"
STATIC_URL = "static/"

# --- Email ------------------------------------------------------------------------------------
# Console by default; the demo writes files under var/emails so it can count what was sent;
# Django's test runner switches to the in-memory backend by itself.
EMAIL_BACKEND = os.environ.get("EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")
EMAIL_FILE_PATH = VAR_DIR / "emails"
DEFAULT_FROM_EMAIL = "blog@example.com"

# --- The blog -----------------------------------------------------------------------------------
#: Seconds between creating (or last editing) a post and the notification email.
BLOG_NOTIFICATION_DELAY = env_seconds("BLOG_NOTIFICATION_DELAY", 15 * 60)

# --- batchframework -----------------------------------------------------------------------------
BATCHFRAMEWORK = {
    "DISPATCH_HORIZON": env_seconds("BATCHFRAMEWORK_DISPATCH_HORIZON", 5 * 60),
    "POLL_INTERVAL": env_seconds("BATCHFRAMEWORK_POLL_INTERVAL", 5),
}

# --- Celery (read by exampleproject/celery.py through the CELERY_ namespace) -------------------
BROKER_DIR = VAR_DIR / "broker"
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL") or "filesystem://"
if CELERY_BROKER_URL.startswith("filesystem"):
    # kombu's filesystem transport: messages are files, so processes on this machine share a
    # broker without a server. One folder serves as both "in" and "out" (producer and consumer
    # are on the same machine); polled every 0.1 s so messages due now are not late. Our
    # subclass makes each message file appear atomically (see exampleproject/filesystem_broker).
    CELERY_BROKER_TRANSPORT = "exampleproject.filesystem_broker:Transport"
    for folder in ("queue", "processed", "control"):
        (BROKER_DIR / folder).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(BROKER_DIR / "queue"),
        "data_folder_out": str(BROKER_DIR / "queue"),
        "processed_folder": str(BROKER_DIR / "processed"),
        "control_folder": str(BROKER_DIR / "control"),
        "store_processed": False,
        "polling_interval": 0.1,
    }
else:
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        # Well above DISPATCH_HORIZON (the batchframework_celery.W001 check compares them).
        "visibility_timeout": 3600,
        "socket_connect_timeout": 2,
        "socket_timeout": 5,
    }
    if os.environ.get("CELERY_BROKER_KEY_PREFIX"):
        CELERY_BROKER_TRANSPORT_OPTIONS["global_keyprefix"] = os.environ["CELERY_BROKER_KEY_PREFIX"]
CELERY_BROKER_CONNECTION_TIMEOUT = 2
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# JSON only: batchframework's messages carry ids, and a worker must never unpickle a message.
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_TASK_IGNORE_RESULT = True
# batchframework publishes to the "default" queue unless a handler names another; the beat
# poller's task goes there too, so one worker with default options sees everything.
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_TIMEZONE = TIME_ZONE
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
if not DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # Celery's Django fix-up otherwise closes the connection around every task: each message
    # would reconnect (system check batchframework_celery.W004 with --deploy).
    CELERY_DB_REUSE_MAX = 1000

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "batchframework": {
            "handlers": ["console"],
            "level": os.environ.get("DJANGO_LOG_LEVEL", "INFO"),
        },
    },
}
