"""The Celery task names. This module imports nothing, so a project's ``celery.py`` can use
them (through :func:`batchframework_celery.beat.beat_schedule`) before Django's apps load."""

RUN_OPERATIONS_TASK = "batchframework.run_operations"
DRAIN_TASK = "batchframework.drain"
POLL_TASK = "batchframework.poll"
