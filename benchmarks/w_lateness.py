"""W2 lateness: operations due over a window, a share beyond DISPATCH_HORIZON (so the
poller hands them to Celery as they come due). Each handler records its start; lateness is
start - run_after. Baseline: plain Celery ETA (countdown) tasks with the same due offsets.

One Celery node runs both phases. The harness plays celery beat: it publishes the
``batchframework.poll`` task every POLL_INTERVAL with the same expiry beat would use.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from batchframework import enqueue_many
from batchframework.conf import get_settings
from batchframework.models import BatchOperation
from batchframework_celery.tasks import poll

from .common import Bench, CorrectnessError, lateness_stats, ratio
from .procs import wait_until

LEAD_S = 2.0  # first due time after enqueue: publishing 1,000 messages takes a while


class _BeatStandIn(threading.Thread):
    def __init__(self, interval: float) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.stopped = threading.Event()
        self.ticks = 0

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                poll.apply_async(expires=self.interval * 2)
                self.ticks += 1
            except Exception as exc:  # keep ticking, like beat
                print(f"warning: poll publish failed: {exc!r}")


def _tracked_phase(
    bench: Bench, proc: Any, offsets: list[float], window_s: float, horizon: float
) -> dict[str, Any]:
    """Enqueue ``bench-stamp`` operations due at ``offsets`` with one ``enqueue_many``
    (dispatched after commit, ETA messages for those within the horizon); wait; measure."""
    n = len(offsets)
    base = time.time() + LEAD_S
    items = [{"run_after": datetime.fromtimestamp(base + o, UTC)} for o in offsets]
    first_id = enqueue_many("bench-stamp", items)[0].pk
    rows = BatchOperation.objects.filter(pk__gte=first_id)
    wait_until(
        lambda: rows.finished().count() >= n,
        timeout=window_s + LEAD_S + 60,
        interval=0.2,
        what="the tracked W2 operations",
        on_tick=lambda: bench.procs.check_alive([proc]),
    )
    values = list(
        rows.values(
            "run_after",
            "created_datetime",
            "started_running_datetime",
            "output_data",
            "attempts",
            "result",
        )
    )
    bad = [v for v in values if v["attempts"] != 1 or v["result"] != "successful"]
    if len(values) != n or bad:
        raise CorrectnessError(f"W2: {len(values)} rows, {len(bad)} not run exactly once")
    tracked, near, far, claim_lat = [], [], [], []
    for v in values:
        late = v["output_data"]["started"] - v["run_after"].timestamp()
        tracked.append(late)
        beyond = (v["run_after"] - v["created_datetime"]).total_seconds() > horizon
        (far if beyond else near).append(late)
        claim_lat.append((v["started_running_datetime"] - v["run_after"]).total_seconds())
    return {
        "tracked": lateness_stats(tracked),
        "within_horizon": lateness_stats(near),
        "beyond_horizon": lateness_stats(far),
        "claim_lateness": lateness_stats(claim_lat),
    }


def _plain_phase(bench: Bench, proc: Any, offsets: list[float], window_s: float) -> dict[str, Any]:
    from .benchapp.tasks import bench_stamp

    n = len(offsets)
    key = f"bench:stamp:{uuid.uuid4().hex[:8]}"
    base = time.time() + LEAD_S
    for o in offsets:
        due = base + o
        bench_stamp.apply_async((key, due), eta=datetime.fromtimestamp(due, UTC))
    wait_until(
        lambda: bench.redis.llen(key) >= n,
        timeout=window_s + LEAD_S + 60,
        interval=0.2,
        what="the plain ETA tasks",
        on_tick=lambda: bench.procs.check_alive([proc]),
    )
    time.sleep(0.3)
    baseline = [float(x) for x in bench.redis.lrange(key, 0, -1)]
    if len(baseline) != n:
        raise CorrectnessError(f"W2 baseline: {len(baseline)} ETA tasks ran, expected {n}")
    return lateness_stats(baseline)


def _with_worker(bench: Bench, env: dict[str, str] | None, phases: list[Any]) -> list[Any]:
    settings = get_settings()
    proc, tag = bench.start_celery_worker(env=env)
    beat = _BeatStandIn(settings.POLL_INTERVAL.total_seconds())
    try:
        bench.wait_celery_ready(proc, tag)
        beat.start()
        return [phase(proc) for phase in phases]
    finally:
        beat.stopped.set()
        bench.procs.stop(proc)


def w2_lateness(bench: Bench, *, n: int, window_s: float, reuse_max: int | None) -> dict[str, Any]:
    settings = get_settings()
    horizon = settings.DISPATCH_HORIZON.total_seconds()
    rng = random.Random(7)
    offsets = sorted(rng.uniform(0, window_s) for _ in range(n))
    bench.reset()
    # The headline runs with CELERY_DB_REUSE_MAX, the setting the docs tell workers to use;
    # the informative row shows Celery's default (a reconnect around every task).
    reuse_env = {"BENCH_CELERY_DB_REUSE_MAX": str(reuse_max)} if reuse_max else None
    tracked, plain = _with_worker(
        bench,
        reuse_env,
        [
            lambda proc: _tracked_phase(bench, proc, offsets, window_s, horizon),
            lambda proc: _plain_phase(bench, proc, offsets, window_s),
        ],
    )
    result = {
        "n": n,
        "window_s": window_s,
        "horizon_s": horizon,
        "poll_interval_s": settings.POLL_INTERVAL.total_seconds(),
        "celery_db_reuse_max": reuse_max,
        **tracked,
        "plain_eta": plain,
    }
    if reuse_max:
        bench.reset()
        [result["without_db_reuse"]] = _with_worker(
            bench,
            None,
            [lambda proc: _tracked_phase(bench, proc, offsets, window_s, horizon)],
        )
    t, b = result["tracked"], result["plain_eta"]
    reuse = f"CELERY_DB_REUSE_MAX={reuse_max}" if reuse_max else "Celery's default connections"
    bench.row(
        "W2",
        f"lateness p50 ms (N={n}, {window_s:g}s window, {reuse})",
        t["p50_ms"],
        b["p50_ms"],
        ratio(t["p50_ms"], b["p50_ms"]),
    )
    bench.row("W2", "lateness p95 ms", t["p95_ms"], b["p95_ms"], ratio(t["p95_ms"], b["p95_ms"]))
    bench.row(
        "W2",
        "lateness p99 ms",
        t["p99_ms"],
        b["p99_ms"],
        ratio(t["p99_ms"], b["p99_ms"]),
        "<= 10 ms",
    )
    bench.row(
        "W2",
        "lateness max ms",
        t["max_ms"],
        b["max_ms"],
        ratio(t["max_ms"], b["max_ms"]),
        "<= 50 ms",
    )
    bench.row("W2", "started early (count)", t["early"], b["early"], "", "0 (checked)")
    for label, st in (
        ("within horizon", result["within_horizon"]),
        ("beyond horizon (poller)", result["beyond_horizon"]),
    ):
        bench.row(
            "W2",
            f"{label}: n / p50 / p99 / max ms",
            f"{st['count']} / {st['p50_ms']:.1f} / {st['p99_ms']:.1f} / {st['max_ms']:.1f}",
        )
    if reuse_max:
        r = result["without_db_reuse"]["tracked"]
        bench.row(
            "W2",
            "without CELERY_DB_REUSE_MAX: p50 / p99 / max ms",
            f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f} / {r['max_ms']:.1f}",
            f"{b['p50_ms']:.1f} / {b['p99_ms']:.1f} / {b['max_ms']:.1f}",
            ratio(r["p99_ms"], b["p99_ms"]),
            "(informative; ratio of p99)",
        )
        if r["early"]:
            bench.errors.append(f"W2 (no db reuse): {r['early']} operations started early")
    if t["early"]:
        bench.errors.append(f"W2: {t['early']} tracked operations started early")
    return result
