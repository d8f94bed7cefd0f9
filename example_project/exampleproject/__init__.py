"""The example project's Django package.

Importing it loads the Celery app (Celery's standard Django layout), so ``@shared_task``
functions bind to it and ``celery -A exampleproject`` finds it.
"""

from .celery import app as celery_app

__all__ = ["celery_app"]
