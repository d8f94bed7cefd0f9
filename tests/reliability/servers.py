"""A private Redis server per test, so broker faults (kill, freeze, restart without
persistence) never touch the shared Redis other test runs use.

:class:`PrivateRedis` starts ``redis-server`` on a free port with persistence off; it can be
killed, frozen (``SIGSTOP``), thawed and restarted on the same port (its data is then gone,
like a broker restarted without persistence). Every process it starts is killed by
:meth:`PrivateRedis.close`, which the ``private_redis`` fixture calls in a ``finally``.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

QUEUES = ("default", "other")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """One ``redis-server`` child process on ``127.0.0.1:<port>``, no persistence."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.executable = shutil.which("redis-server")
        if self.executable is None:  # pragma: no cover
            raise RuntimeError("redis-server is not installed")
        self.directory = directory
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._starts = 0
        self._client = None

    # --- Lifecycle ---------------------------------------------------------------------------
    def start(self, *, timeout: float = 10) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        self._starts += 1
        log = open(self.directory / f"redis-{self.port}-{self._starts}.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                self.executable,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not answer")
            time.sleep(0.02)

    def kill(self) -> None:
        """``kill -9`` the server: connections drop, its state is gone."""
        self._drop_client()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def restart(self) -> None:
        """Kill and start again on the same port, empty (no persistence)."""
        self.kill()
        self.start()

    def freeze(self) -> None:
        """``SIGSTOP``: the port still accepts connections but nothing answers."""
        assert self.process is not None
        self._drop_client()
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.kill()

    # --- Looking in ------------------------------------------------------------------------------
    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.settimeout(0.5)
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    @property
    def client(self):  # type: ignore[no-untyped-def]
        if self._client is None:
            import redis

            self._client = redis.Redis(host="127.0.0.1", port=self.port, db=0, socket_timeout=5)
        return self._client

    def _drop_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def waiting(self, queue: str = "default") -> int:
        """Messages waiting in ``queue`` (kombu keeps priority levels in extra lists)."""
        keys = [queue, *(f"{queue}\x06\x16{level}" for level in (3, 6, 9))]
        return sum(int(self.client.llen(key)) for key in keys)

    def unacked(self) -> int:
        """Messages delivered to a consumer and not yet acknowledged (held ETA messages)."""
        return int(self.client.hlen("unacked"))

    def messages(self) -> int:
        """Everything the broker holds for the tests' queues: waiting plus unacknowledged."""
        return sum(self.waiting(q) for q in QUEUES) + self.unacked()
