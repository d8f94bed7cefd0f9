"""Plain Celery tasks, the untracked baselines. They count and time themselves in Redis.

``bench_incr``: one no-op task; the key's counter says how many ran, and the first and the
N-th one store their wall-clock time. ``bench_stamp``: a countdown/ETA task that pushes its
lateness (start - due, seconds) onto a list.
"""

import os
import time

import redis
from celery import shared_task
from django.conf import settings

_client: tuple[int, redis.Redis] | None = None


def client() -> redis.Redis:
    """One Redis client per process (prefork children get their own after the fork)."""
    global _client
    if _client is None or _client[0] != os.getpid():
        _client = (os.getpid(), redis.Redis.from_url(settings.CELERY_BROKER_URL))
    return _client[1]


@shared_task(name="bench.incr", ignore_result=True)
def bench_incr(key: str, total: int) -> None:
    started = time.time()
    r = client()
    value = r.incr(key)
    if value == 1:
        r.set(f"{key}:first", started)
    if value == total:
        r.set(f"{key}:last", time.time())


@shared_task(name="bench.stamp", ignore_result=True)
def bench_stamp(key: str, due: float) -> None:
    started = time.time()
    client().rpush(key, started - due)
