"""The relay, with real ``celery worker`` processes on PostgreSQL and Redis: with
``RelayDispatcher`` the web process publishes nothing for an ``enqueue``; one worker's relay
publishes (immediate and ETA operations alike), a second worker stands by, and takes over when
the first is killed. No beat runs here, so nothing but the relay can hand operations on."""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from django.conf import settings
from django.db import connection, transaction
from django.test import override_settings

from batchframework import BatchOperation, enqueue
from batchframework_celery import relay as relay_module
from batchframework_celery.dispatcher import RelayDispatcher
from batchframework_celery.poller import poll_once
from batchframework_celery.publish import bounded_publishing
from batchframework_celery.relay import CHANNEL, LOCK_KEY, Relay

from .helpers import (
    all_finished,
    assert_never_early,
    assert_ran_once_each,
    database_url_for_subprocesses,
    subprocess_env,
    wait_for,
)
from .silent_network import SilentNetwork

pytestmark = [
    pytest.mark.celery,
    pytest.mark.django_db(transaction=True),
    pytest.mark.timeout(120),
    pytest.mark.skipif(connection.vendor != "postgresql", reason="NOTIFY is PostgreSQL's"),
]

ROOT = Path(__file__).resolve().parents[2]
RELAY_DISPATCHER = "batchframework_celery.dispatcher.RelayDispatcher"
POLL_INTERVAL = 0.5
RELAY = {**settings.BATCHFRAMEWORK, "DISPATCHER": RELAY_DISPATCHER, "DISPATCH_HORIZON": 5}


def relay_worker_env(broker_url: str, **extra: str) -> dict[str, str]:
    """A worker subprocess's environment: RelayDispatcher, short poll interval, this broker."""
    return subprocess_env(
        CELERY_BROKER_URL=broker_url,
        BF_DISPATCHER=RELAY_DISPATCHER,
        BF_POLL_INTERVAL=str(POLL_INTERVAL),
        BF_DISPATCH_HORIZON="5",
        **extra,
    )


def start_worker(log: Path, env: dict[str, str]) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(
            [
                sys.executable,
                *("-m", "celery", "-A", "tests.celery_app", "worker", "-l", "info"),
                *("-P", "solo", "-Q", "default,other", "-n", f"relay-{uuid.uuid4().hex[:8]}@%h"),
                *("--without-mingle", "--without-gossip", "--without-heartbeat"),
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def logged(log: Path, event: str) -> bool:
    return re.search(rf"\bevent={event}\b", log.read_text(errors="replace")) is not None


def test_relay_publishes_for_the_web_process_and_a_standby_takes_over(purge_broker, tmp_path):
    broker = purge_broker
    env = relay_worker_env(broker.url)
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    with override_settings(BATCHFRAMEWORK=RELAY):
        # The web side publishes nothing, not even after commit ...
        with transaction.atomic():
            unheard = enqueue("test-effect")
        bounded_publishing.drain()
        assert broker.total() == 0
    first = start_worker(first_log, env)
    second = None
    try:
        assert wait_for(lambda: logged(first_log, "relay_started"), timeout=30), (
            first_log.read_text()[-3000:]
        )
        # ... and a worker's relay publishes what it hears announced.
        with override_settings(BATCHFRAMEWORK=RELAY):
            now = [enqueue("test-effect").pk for _ in range(10)]
            soon = [enqueue("test-effect", delay=timedelta(seconds=1)).pk for _ in range(5)]
            other = [enqueue("test-other-queue").pk for _ in range(2)]
            # Anyone may NOTIFY on the channel: what is not an id is ignored, and the ids
            # announced with it are published.
            with transaction.atomic():
                with connection.cursor() as cursor:
                    for junk in ("not an id", "²", "-1", "9" * 30):  # digits, but no ids
                        cursor.execute("SELECT pg_notify(%s, %s)", [CHANNEL, junk])
                now.append(enqueue("test-effect").pk)
        assert wait_for(all_finished([*now, *soon, *other]), timeout=20, interval=0.1), (
            first_log.read_text()[-3000:]
        )
        assert not logged(first_log, "relay_error"), first_log.read_text()[-3000:]
        assert_ran_once_each([*now, *soon])
        assert_never_early(soon, late_by=1.0)
        # Announced while no relay listened: lost, as documented; the poller finds it.
        assert BatchOperation.objects.get(pk=unheard.pk).status == "unprocessed"
        assert poll_once()["drain_messages"] >= 1
        assert wait_for(all_finished([unheard.pk]), timeout=20, interval=0.1)

        # A second worker stands by while the first holds the relay's lock ...
        second = start_worker(second_log, env)
        assert wait_for(lambda: logged(second_log, "relay_standby"), timeout=30), (
            second_log.read_text()[-3000:]
        )
        assert not logged(second_log, "relay_started")
        # ... and takes over once the first dies without a chance to clean up.
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        assert wait_for(lambda: logged(second_log, "relay_started"), timeout=30), (
            second_log.read_text()[-3000:]
        )
        with override_settings(BATCHFRAMEWORK=RELAY):
            later = [enqueue("test-effect").pk for _ in range(5)]
        assert wait_for(all_finished(later), timeout=20, interval=0.1), second_log.read_text()[
            -3000:
        ]
        assert_ran_once_each(later)
        second.send_signal(signal.SIGTERM)
        assert second.wait(20) == 0, second_log.read_text()[-3000:]
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)


def assert_relays_again(log: Path, started: int, *, timeout: float) -> None:
    """The worker's relay starts listening again (once more than ``started`` times), and
    publishes what is enqueued from then on: each operation runs once."""
    assert wait_for(
        lambda: log.read_text().count("event=relay_started") > started, timeout=timeout
    ), log.read_text()[-3000:]
    with override_settings(BATCHFRAMEWORK=RELAY):
        ids = [enqueue("test-effect").pk for _ in range(5)]
    assert wait_for(all_finished(ids), timeout=20, interval=0.1), log.read_text()[-3000:]
    assert_ran_once_each(ids)


def test_relay_reconnects_when_its_database_session_is_killed(purge_broker, tmp_path):
    """A relay whose session ends (database restart, failover, an admin's
    ``pg_terminate_backend``) logs ``relay_error``, reconnects, takes the lock again, and
    publishes what is announced afterwards."""
    env = relay_worker_env(purge_broker.url)
    log = tmp_path / "worker.log"
    worker = start_worker(log, env)
    try:
        assert wait_for(lambda: logged(log, "relay_started"), timeout=30), log.read_text()[-3000:]
        started = log.read_text().count("event=relay_started")
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' "
                "AND ((classid::bigint << 32) | objid::bigint) = %s",
                [LOCK_KEY],
            )
            assert [row[0] for row in cursor.fetchall()] == [True]
        assert wait_for(lambda: logged(log, "relay_error"), timeout=15), log.read_text()[-3000:]
        assert_relays_again(log, started, timeout=15)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)


def test_relay_starts_again_when_the_network_drops_its_session_silently(purge_broker, tmp_path):
    """A session the network drops without a word (a NAT forgetting it, a failover leaving it
    half-open; here a relay in between stops forwarding, while both ends' kernels still
    answer TCP keepalives) would leave the relay waiting on it forever, deaf to every enqueue,
    and the server holding its lock for every other relay. The quiet relay's probe goes
    unanswered and it cuts its end (``relay_unresponsive``); the server, which hears nothing
    of that, ends the silent session itself (the relay set ``idle_session_timeout`` on it),
    which frees the lock; the relay, standing by on a new session meanwhile, takes it and
    listens again."""
    settings_dict = connection.settings_dict
    network = SilentNetwork(
        (settings_dict["HOST"] or "127.0.0.1", int(settings_dict["PORT"] or 5432))
    )
    url = urlsplit(database_url_for_subprocesses())
    through = url._replace(netloc=f"{url.netloc.rsplit('@', 1)[0]}@127.0.0.1:{network.port}")
    env = relay_worker_env(purge_broker.url, DATABASE_URL=urlunsplit(through))
    log = tmp_path / "worker.log"
    worker = start_worker(log, env)
    try:
        assert wait_for(lambda: logged(log, "relay_started"), timeout=30), log.read_text()[-3000:]
        started = log.read_text().count("event=relay_started")
        assert network.silence() >= 1
        # Quiet for a poll interval, then the probe's timeout (5 s at least), then cut.
        assert wait_for(lambda: logged(log, "relay_unresponsive"), timeout=20), log.read_text()[
            -3000:
        ]
        # The server ends the silent session (idle_session_timeout: about 17 s here).
        assert_relays_again(log, started, timeout=45)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
        network.close()


def test_the_relay_dispatcher_announces_only_on_the_database_its_relay_listens_to():
    """The relay listens on the router's write database for operations. An operation enqueued
    with ``using=`` another alias is published after commit instead: announced there, nobody
    would hear it, and it would wait for the poller."""
    dispatcher = RelayDispatcher()
    assert dispatcher.notify_channel("default") == CHANNEL
    assert dispatcher.notify_channel("another_database") is None


def test_a_relay_query_stuck_behind_a_lock_fails_cleanly_and_the_relay_starts_again(caplog):
    """A healthy server can hold the relay's query behind a lock (an ``ALTER TABLE`` waiting
    for a long transaction). Cut from the relay's end after the probe timeout, that session
    would stay on the server, still waiting and holding the relay's lock, and every relay
    would stand by until the blocker ends. The relay's ``statement_timeout`` (half the probe
    timeout) fails the query on the server instead: the relay lets go of its lock and starts
    again on a new session while the blocker still holds its lock."""
    caplog.set_level(logging.INFO, logger="batchframework")
    blocker = psycopg.connect(**connection.get_connection_params())
    relay = Relay()
    with override_settings(BATCHFRAMEWORK={**settings.BATCHFRAMEWORK, "POLL_INTERVAL": 0.2}):
        relay.start()
        try:
            assert wait_for(lambda: caplog.text.count("event=relay_started") == 1, timeout=20)
            table = BatchOperation._meta.db_table
            blocker.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            with connection.cursor() as cursor:  # the relay's next query waits for the lock
                cursor.execute("SELECT pg_notify(%s, '1')", [CHANNEL])
            assert wait_for(lambda: "event=relay_error" in caplog.text, timeout=10), caplog.text
            assert wait_for(lambda: caplog.text.count("event=relay_started") == 2, timeout=10), (
                caplog.text
            )
            assert "relay_unresponsive" not in caplog.text
        finally:
            blocker.rollback()
            blocker.close()
            relay.stop(timeout=10)


def test_a_session_setting_the_server_refuses_is_done_without(caplog, monkeypatch):
    """A server that refuses one of the relay's session settings (a PostgreSQL look-alike
    without ``idle_session_timeout``) costs that setting, logged, not the relay."""
    caplog.set_level(logging.INFO, logger="batchframework")
    real = relay_module.session_settings
    monkeypatch.setattr(
        relay_module, "session_settings", lambda version: {"no_such_setting": 1, **real(version)}
    )
    relay = Relay()
    relay.start()
    try:
        assert wait_for(lambda: "event=relay_started" in caplog.text, timeout=20), caplog.text
        assert "event=relay_setting_refused name=no_such_setting" in caplog.text
        assert "relay_error" not in caplog.text
    finally:
        relay.stop(timeout=10)


def test_notifications_that_name_no_operation_do_not_get_the_relays_session_ended(
    caplog, monkeypatch
):
    """Anyone may NOTIFY on the channel. A steady trickle of payloads that name no operation
    used to keep the relay from probing (it had heard something) while it sent the server
    nothing (no ids, no query): the server's ``idle_session_timeout``, which counts from the
    client's last command, then ended a healthy session again and again, and the relay was
    deaf while it started again. It probes by when it last spoke instead."""
    caplog.set_level(logging.INFO, logger="batchframework")
    real = relay_module.session_settings
    # A short server timeout (1 s, five poll intervals) so that the test takes seconds.
    monkeypatch.setattr(
        relay_module,
        "session_settings",
        lambda version: {**real(version), "idle_session_timeout": 1000},
    )
    relay = Relay()
    with override_settings(BATCHFRAMEWORK={**settings.BATCHFRAMEWORK, "POLL_INTERVAL": 0.2}):
        relay.start()
        try:
            assert wait_for(lambda: "event=relay_started" in caplog.text, timeout=20), caplog.text
            with psycopg.connect(**connection.get_connection_params(), autocommit=True) as other:
                for _ in range(40):  # 4 s: four server timeouts
                    other.execute("SELECT pg_notify(%s, 'hello')", [CHANNEL])
                    time.sleep(0.1)
            assert "relay_error" not in caplog.text, caplog.text
            assert caplog.text.count("event=relay_started") == 1
        finally:
            relay.stop(timeout=10)
