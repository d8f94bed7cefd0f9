"""batchframework_celery: the Celery transport for batchframework.

Add ``"batchframework_celery"`` to ``INSTALLED_APPS`` (after ``"batchframework"``) and
``enqueue`` publishes operations to Celery after commit; ``batchframework.poll``, run by celery
beat, makes the database the source of truth. This package decides *when and where* operations
run; whether one may run is decided by :mod:`batchframework.engine`.
"""

__all__: list[str] = []
