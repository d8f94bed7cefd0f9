"""Private servers and subprocesses for the reliability suite (part 2).

- :class:`PrivatePostgres`: a throw-away PostgreSQL cluster (``initdb`` as the ``postgres`` OS
  user, trust auth, a free port) that a test may stop and start at will. The shared server on
  port 5432 is never touched.
- :class:`PrivateRedis`: a throw-away ``redis-server`` on a free port, without persistence.
- :class:`Processes`: subprocesses (workers, beats, scripts) in their own process groups, with
  their output in log files; every one still alive is killed (by its id) at the end.
- :func:`report`: the one ``RELIABILITY scenario=…`` summary line each test prints.

Everything here is bounded in time; every server and process is stopped in ``finally``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.integration.helpers import wait_for as wait_until

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = "tests.reliability.settings_part2"
PYTHON = sys.executable


# --- The summary line --------------------------------------------------------------------
def report(
    scenario: Any,
    *,
    operations: int,
    runs: int,
    duplicates: int,
    lost: int,
    seconds: float,
    **extra: Any,
) -> str:
    """Print (and return) the scenario's one summary line."""
    line = (
        f"RELIABILITY scenario={scenario} operations={operations} runs={runs} "
        f"duplicates={duplicates} lost={lost} seconds={seconds:.1f}"
    )
    if extra:
        line += " " + " ".join(f"{key}={value}" for key, value in extra.items())
    print(line, flush=True)
    return line


# --- Small utilities -----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_database_url() -> str:
    """DATABASE_URL of the test database pytest-django created (for subprocesses)."""
    from tests.integration.helpers import test_database_url as url

    return url()


def subprocess_env(database_url: str | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": SETTINGS,
            "DATABASE_URL": database_url or test_database_url(),
            "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.pop("BF_CLOCK_SKEW_SECONDS", None)
    env.update(extra)
    return env


# --- Subprocesses --------------------------------------------------------------------------
class Processes:
    """Starts subprocesses in their own sessions; :meth:`cleanup` kills the survivors' groups."""

    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        self.directory = Path(directory)
        self.env = env
        self.started: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(
        self, label: str, args: list[str], *, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        path = self.directory / f"{len(self.started):02d}-{label}.log"
        log = open(path, "wb")  # noqa: SIM115 (the child owns it; closed below)
        try:
            process = subprocess.Popen(
                args,
                cwd=ROOT,
                env=env or self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        self.started.append((label, process, path))
        return process

    def django(
        self, label: str, *command: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        return self.start(label, [PYTHON, "-m", "django", *command], env=env)

    def worker(
        self, label: str = "dbworker", *args: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        return self.django(label, "batchframework_worker", "--poll-interval", "0.2", *args, env=env)

    def celery_worker(
        self, label: str = "celery-worker", *, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        return self.start(
            label,
            [
                PYTHON,
                "-m",
                "celery",
                "-A",
                "tests.celery_app",
                "worker",
                "-P",
                "prefork",
                "-c",
                "2",
                "-Q",
                "default,other",
                "-l",
                "info",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-n",
                f"{label}-{os.getpid()}@%h",
            ],
            env=env,
        )

    def celery_beat(
        self, label: str = "beat", *, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        schedule = self.directory / f"{label}-schedule"
        return self.start(
            label,
            [
                PYTHON,
                "-m",
                "celery",
                "-A",
                "tests.celery_app",
                "beat",
                "-S",
                "django_celery_beat.schedulers:DatabaseScheduler",
                "-l",
                "info",
                "-s",
                str(schedule),
                "--pidfile",
                str(self.directory / f"{label}.pid"),
            ],
            env=env,
        )

    def python(
        self, label: str, code: str, *, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        prelude = "import django\ndjango.setup()\n"
        return self.start(label, [PYTHON, "-c", prelude + textwrap.dedent(code)], env=env)

    def run_python(
        self, label: str, code: str, *, timeout: float = 60, env: dict[str, str] | None = None
    ) -> str:
        process = self.python(label, code, env=env)
        try:
            code_ = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(process)
            raise AssertionError(
                f"{label} did not finish in {timeout}s\n{self.log_of(process)}"
            ) from None
        output = self.log_of(process)
        assert code_ == 0, f"{label} exited {code_}\n{output}"
        return output

    def log_of(self, process: subprocess.Popen[bytes]) -> str:
        for _, candidate, path in self.started:
            if candidate is process:
                return path.read_text(errors="replace")
        return ""

    def logs(self, label_prefix: str = "") -> str:
        return "\n".join(
            f"--- {label} (pid {p.pid}, rc {p.poll()})\n" + path.read_text(errors="replace")
            for label, p, path in self.started
            if label.startswith(label_prefix)
        )

    @staticmethod
    def kill(process: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        """Signal the process's group (it leads its own session), then reap it."""
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)

    def stop(self, process: subprocess.Popen[bytes], *, timeout: float = 8) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=timeout)
        self.kill(process)

    def cleanup(self) -> None:
        for _, process, _ in self.started:
            self.kill(process)
        # Children of a group leader that already exited (e.g. celery pool processes).
        for _, process, _ in self.started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)


# --- A private Redis -----------------------------------------------------------------------
class PrivateRedis:
    """``redis-server`` on a free port, no persistence; :meth:`stop` kills it."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        import redis

        self.client = redis.Redis(port=self.port, socket_timeout=2)
        wait_until(self._answers, timeout=10, what="private redis")

    def _answers(self) -> bool:
        try:
            return bool(self.client.ping())
        except Exception:
            return False

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
        if self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)


@contextlib.contextmanager
def private_redis(directory: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(directory)
    try:
        yield server
    finally:
        server.stop()


# --- A private PostgreSQL cluster ----------------------------------------------------------
def postgres_bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


class PrivatePostgres:
    """A PostgreSQL cluster of our own, owned by the ``postgres`` OS user, on a free port."""

    def __init__(self) -> None:
        bindir = postgres_bin_dir()
        if bindir is None:
            raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql")
        self.bindir = bindir
        self.port = free_port()
        self.base = Path(tempfile.mkdtemp(prefix="bf-private-pg-"))
        self.data = self.base / "data"
        self.logfile = self.base / "server.log"
        shutil.chown(self.base, user="postgres", group="postgres")
        self._as_postgres(
            [
                str(bindir / "initdb"),
                "-D",
                str(self.data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ],
            timeout=60,
        )

    def url(self, dbname: str = "postgres") -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{dbname}"

    def _as_postgres(
        self, args: list[str], *, timeout: float, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        command = ["runuser", "-u", "postgres", "--", *args]
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, cwd=self.base
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} failed: {result.stdout}\n{result.stderr}\n{self.server_log()}"
            )
        return result

    def server_log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=50"
        )
        self._as_postgres(
            [
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.logfile),
                "-o",
                options,
                "-w",
                "-t",
                "30",
                "start",
            ],
            timeout=40,
        )

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres(
            [
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.data),
                "-m",
                mode,
                "-w",
                "-t",
                "30",
                "stop",
            ],
            timeout=40,
            check=False,
        )

    def connect(self, dbname: str) -> Any:
        import psycopg

        return psycopg.connect(self.url(dbname), autocommit=True, connect_timeout=3)

    def create_database(self, dbname: str) -> str:
        """Create ``dbname`` and return its URL."""
        with self.connect("postgres") as conn:
            conn.execute(f'CREATE DATABASE "{dbname}"')
        return self.url(dbname)

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)


@contextlib.contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    try:
        server.start()
        yield server
    finally:
        server.destroy()


# --- Celery subprocess stacks --------------------------------------------------------------
def register_poller(processes: Processes, *, env: dict[str, str] | None = None) -> str:
    """``manage.py batchframework_register_poller --queue default`` (the worker consumes
    ``default``), in a subprocess; returns its output."""
    process = processes.django(
        "register-poller", "batchframework_register_poller", "--queue", "default", env=env
    )
    try:
        rc = process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        processes.kill(process)
        raise AssertionError("batchframework_register_poller hung") from None
    output = processes.log_of(process)
    assert rc == 0, output
    return output
