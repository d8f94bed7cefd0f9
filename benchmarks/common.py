"""Shared pieces of the workloads: the run's context, worker start-up, resets, statistics."""

from __future__ import annotations

import contextlib
import math
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
from django.conf import settings
from django.db import connection
from django.test import override_settings

from .procs import Procs, tail, wait_until

NULL_DISPATCHER = "batchframework.dispatch.NullDispatcher"
RELAY_DISPATCHER = "batchframework_celery.dispatcher.RelayDispatcher"
CELERY_READY_TIMEOUT = 60.0


class CorrectnessError(Exception):
    """An operation ran twice, ran early, or did not run: the run fails."""


@dataclass
class Bench:
    quick: bool
    procs: Procs
    redis: redis.Redis
    results: dict[str, Any] = field(default_factory=dict)
    rows: list[tuple[str, str, str, str, str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def row(
        self,
        workload: str,
        metric: str,
        value: Any,
        baseline: Any = "",
        ratio: Any = "",
        target: str = "",
    ) -> None:
        self.rows.append((workload, metric, fmt(value), fmt(baseline), fmt_ratio(ratio), target))

    # --- State between workloads ---------------------------------------------------------
    def reset(self, *, keep_operations: bool = False) -> None:
        """Empty the broker's DB 13 and (unless kept) the operations table."""
        self.redis.flushdb()
        if not keep_operations:
            with connection.cursor() as cursor:
                cursor.execute(
                    "TRUNCATE batchframework_batchoperation, benchapp_card, benchapp_player, "
                    "benchapp_game CASCADE"
                )

    # --- Workers -----------------------------------------------------------------------------
    def start_celery_worker(
        self, *, env: dict[str, str] | None = None
    ) -> tuple[subprocess.Popen[bytes], str]:
        """One Celery node: prefork pool with 2 processes, consuming the ``default`` queue."""
        tag = uuid.uuid4().hex[:8]
        proc = self.procs.spawn(
            [
                "-m",
                "celery",
                "-A",
                "benchmarks.celery_app",
                "worker",
                "-P",
                "prefork",
                "-c",
                "2",
                "-Q",
                "default",
                "-n",
                f"bench-{tag}@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-l",
                "WARNING",
            ],
            name=f"celery-{tag}",
            env={"BENCH_WORKER_TAG": tag, **(env or {})},
        )
        return proc, tag

    def celery_ready_at(self, tag: str) -> float | None:
        value = self.redis.get(f"bench:worker-ready:{tag}")
        return float(value) if value else None

    def wait_celery_ready(self, proc: subprocess.Popen[bytes], tag: str) -> float:
        return float(
            wait_until(  # type: ignore[arg-type]
                lambda: self.celery_ready_at(tag),
                timeout=CELERY_READY_TIMEOUT,
                what="the Celery worker to be ready",
                on_tick=lambda: self.procs.check_alive([proc]),
            )
        )

    def start_db_workers(self, count: int = 2) -> list[subprocess.Popen[bytes]]:
        """``count`` ``batchframework_worker`` processes (one per core)."""
        return [
            self.procs.spawn(
                ["-m", "django", "batchframework_worker", "--name", f"bench-db-{i}"],
                name=f"dbworker-{i}",
            )
            for i in range(count)
        ]


def db_worker_started(proc: subprocess.Popen[bytes]) -> bool:
    return "worker started" in tail(proc.log_path, 5)  # type: ignore[attr-defined]


@contextlib.contextmanager
def dispatcher(path: str | None) -> Iterator[None]:
    """Enqueue with this dispatcher (``None``: the configured one, Celery)."""
    if path is None:
        yield
        return
    with override_settings(BATCHFRAMEWORK={**settings.BATCHFRAMEWORK, "DISPATCHER": path}):
        yield


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def lateness_stats(values_s: list[float]) -> dict[str, Any]:
    values = sorted(values_s)
    ms = [v * 1000 for v in values]
    return {
        "count": len(values),
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
        "max_ms": ms[-1] if ms else math.nan,
        "min_ms": ms[0] if ms else math.nan,
        "early": sum(1 for v in values if v < 0),
    }


def ratio(value: float, baseline: float) -> float:
    return value / baseline if baseline else math.nan


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def fmt_ratio(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.2f}x"
    return str(value)


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
