"""Subprocesses of the harness: start them in their own session, sample their memory, and
always stop them (SIGTERM to the process group, then SIGKILL after a bounded wait)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


class Procs:
    """Every process the harness started; :meth:`stop_all` is called in ``finally`` blocks."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: list[subprocess.Popen[bytes]] = []
        self._count = 0

    def spawn(
        self, args: list[str], *, name: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        self._count += 1
        full_env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(REPO_ROOT),
            **(env or {}),
        }
        log = self.log_dir / f"{self._count:02d}-{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, *args],
                cwd=REPO_ROOT,
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc.log_path = log  # type: ignore[attr-defined]
        self.running.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
        """SIGTERM the process group (warm shutdown), SIGKILL it if it lingers."""
        if proc not in self.running:
            return
        self.running.remove(proc)
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
            # The leader exited; make sure no pool child of it survives.
            _kill_group_leftovers(proc.pid)
            break
        else:
            proc.wait(5.0)

    def stop_all(self) -> None:
        for proc in list(self.running):
            try:
                self.stop(proc)
            except Exception as exc:  # keep stopping the others
                print(f"warning: could not stop pid {proc.pid}: {exc!r}", file=sys.stderr)

    def check_alive(self, procs: list[subprocess.Popen[bytes]]) -> None:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"worker pid {proc.pid} exited with {proc.returncode}; last log lines:\n"
                    + tail(proc.log_path)  # type: ignore[attr-defined]
                )


def _kill_group_leftovers(pgid: int) -> None:
    for pid in group_members(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def group_members(pgid: int) -> list[int]:
    """Pids whose process group is ``pgid`` (the leader and, e.g., Celery's pool children)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def rss_kib(pid: int) -> int:
    """Resident set size of one process (``VmRSS`` in ``/proc/<pid>/status``), in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def group_rss_kib(procs: list[subprocess.Popen[bytes]]) -> dict[int, int]:
    return {pid: rss_kib(pid) for proc in procs for pid in group_members(proc.pid)}


def wait_until(
    predicate: Callable[[], object],
    *,
    timeout: float,
    interval: float = 0.05,
    what: str = "condition",
    on_tick: Callable[[], None] | None = None,
) -> object:
    """Poll ``predicate`` until it returns something truthy; raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if on_tick is not None:
            on_tick()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
