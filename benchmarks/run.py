"""Run every benchmark workload and print a table; see benchmarks/README.md.

    python -m benchmarks.run [--quick] [--json PATH]

Creates a fresh PostgreSQL database (``bench_<random>`` on the server of ``DATABASE_URL``,
default ``postgres://postgres@127.0.0.1:5432``), migrates it, runs W1-W5, and drops it. Uses
Redis DB 13 (``BENCH_REDIS_URL``) as the broker and flushes that DB between workloads. Exits
non-zero if a workload crashed or a correctness check failed (an operation ran twice, early,
or not at all); missing a performance target does not fail the run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

DEFAULT_SERVER_URL = "postgres://postgres@127.0.0.1:5432/postgres"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true", help="small N (CI mode, a couple of minutes)"
    )
    parser.add_argument("--json", metavar="PATH", help="write every figure to this JSON file")
    parser.add_argument("--only", metavar="W1,W2,...", help="run only these workloads")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="W1 repeats, interleaved, median reported (default 1)",
    )
    parser.add_argument(
        "--celery-db-reuse-max",
        type=int,
        default=1000,
        metavar="N",
        help="CELERY_DB_REUSE_MAX for W2's headline run (the setting the docs recommend for "
        "workers; W2 also runs once without it) and for an extra W1 row in full mode "
        "(0: Celery's default everywhere)",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep worker logs")
    return parser.parse_args(argv)


def _database_urls() -> tuple[str, str, str]:
    """(server URL to connect for CREATE/DROP, the fresh database's URL, its name)."""
    base = os.environ.get("DATABASE_URL") or DEFAULT_SERVER_URL
    parts = urlsplit(base)
    if not parts.scheme.startswith("postgres"):
        raise SystemExit("benchmarks need PostgreSQL: set DATABASE_URL=postgres://...")
    name = f"bench_{uuid.uuid4().hex[:10]}"
    server = urlunsplit(parts._replace(path="/postgres"))
    return server, urlunsplit(parts._replace(path=f"/{name}")), name


def _create_database(server: str, name: str) -> None:
    import psycopg

    with psycopg.connect(server, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')


def _drop_database(server: str, name: str) -> None:
    import psycopg

    with psycopg.connect(server, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _machine() -> dict[str, Any]:
    import celery
    import django
    import kombu
    from django.db import connection

    from benchmarks.benchapp.tasks import client

    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        pg = cursor.fetchone()[0]
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "django": django.get_version(),
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "postgresql": pg,
        "redis": client().info("server")["redis_version"],
        "loadavg_at_start": load,
    }


def _print_table(rows: list[tuple[str, ...]]) -> None:
    header = ("", "metric", "batchframework", "baseline", "ratio", "target / note")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    print(line)
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)))
    print(line)
    last = None
    for row in rows:
        if last is not None and row[0] != last:
            print()
        last = row[0]
        print(
            "  ".join(
                str(c).ljust(w) if i < 2 else str(c).rjust(w) if i < 5 else str(c)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    print(line)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    quick = args.quick
    cfg = {
        "w1_n": 1_000 if quick else 10_000,
        "w1_repeats": args.repeats or 1,
        "w2_n": 200 if quick else 1_000,
        "w2_window_s": 8.0 if quick else 30.0,
        "w3_single": 300 if quick else 3_000,
        "w3_many": 10_000,
        "w5_n": 10_000 if quick else 100_000,
        # W1 runs inside W5: long enough (about a second) that start-up jitter doesn't decide
        # the with/without-history ratio.
        "w5_w1_n": 5_000 if quick else 10_000,
        "w5_repeats": 3 if quick else 5,
        "celery_db_reuse_max": args.celery_db_reuse_max or None,
        # The W1 variant with CELERY_DB_REUSE_MAX is skipped in quick mode (time); W2's is not.
        "w1_reuse_variant": bool(args.celery_db_reuse_max) and not quick,
    }
    only = {w.strip().upper() for w in args.only.split(",")} if args.only else None
    server, db_url, db_name = _database_urls()
    os.environ["DATABASE_URL"] = db_url
    os.environ["DJANGO_SETTINGS_MODULE"] = "benchmarks.settings"
    log_dir = Path(tempfile.mkdtemp(prefix="batchframework-bench-"))

    # SIGTERM from CI/timeouts: turn it into an exception so the finally blocks run.
    def _terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _terminate)

    from .procs import Procs

    procs = Procs(log_dir)
    started = time.time()
    created = False
    bench = None
    try:
        _create_database(server, db_name)
        created = True
        import django

        django.setup()
        from django.core.management import call_command

        import benchmarks.celery_app  # noqa: F401  (binds the shared tasks to the app)
        from benchmarks.benchapp.tasks import client

        from .common import Bench

        call_command("migrate", verbosity=0)
        bench = Bench(quick=quick, procs=procs, redis=client())
        bench.results["machine"] = _machine()
        bench.results["config"] = {
            **cfg,
            "database": db_name,
            "quick": quick,
            "batchframework": _bf_settings(),
        }
        print(
            f"batchframework benchmarks ({'quick' if quick else 'full'}) on "
            f"{bench.results['machine']['cpu_count']} CPUs, PostgreSQL "
            f"{bench.results['machine']['postgresql']}, Redis "
            f"{bench.results['machine']['redis']}; logs in {log_dir}",
            flush=True,
        )
        _run_workloads(bench, cfg, only)
    except KeyboardInterrupt as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        if bench is not None:
            bench.errors.append(f"interrupted: {exc}")
        else:
            return 130
    except Exception:
        traceback.print_exc()
        if bench is None:
            return 1
        bench.errors.append("harness: " + traceback.format_exc(limit=3))
    finally:
        procs.stop_all()
        if created:
            try:
                from django.db import connections

                connections.close_all()
            except Exception:
                pass
            try:
                _drop_database(server, db_name)
            except Exception as exc:
                print(f"warning: could not drop database {db_name}: {exc!r}", file=sys.stderr)
        if bench is not None:
            with contextlib.suppress(Exception):
                bench.redis.flushdb()
    elapsed = time.time() - started
    bench.results["elapsed_s"] = elapsed
    bench.results["errors"] = bench.errors
    bench.results["table"] = [list(r) for r in bench.rows]
    print()
    _print_table(bench.rows)
    print(f"\nfinished in {elapsed:.0f}s; worker logs in {log_dir}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(bench.results, indent=2, default=str))
        print(f"wrote {args.json}")
    if bench.errors:
        print("\nFAILED:", *bench.errors, sep="\n  ", file=sys.stderr)
        return 1
    if not args.keep_logs:
        for path in log_dir.iterdir():
            path.unlink()
        log_dir.rmdir()
    return 0


def _bf_settings() -> dict[str, Any]:
    import dataclasses

    from batchframework.conf import get_settings

    return {k: str(v) for k, v in dataclasses.asdict(get_settings()).items()}


def _run_workloads(bench: Any, cfg: dict[str, Any], only: set[str] | None) -> None:
    from .common import CorrectnessError
    from .w_enqueue import w3_enqueue
    from .w_lateness import w2_lateness
    from .w_queries import w4_queries
    from .w_throughput import w1_throughput, w5_memory_and_scale

    steps = [
        ("W4", lambda: w4_queries(bench)),
        ("W3", lambda: w3_enqueue(bench, n_single=cfg["w3_single"], n_many=cfg["w3_many"])),
        (
            "W1",
            lambda: w1_throughput(
                bench,
                n=cfg["w1_n"],
                repeats=cfg["w1_repeats"],
                reuse_max=cfg["celery_db_reuse_max"] if cfg["w1_reuse_variant"] else None,
            ),
        ),
        (
            "W2",
            lambda: w2_lateness(
                bench,
                n=cfg["w2_n"],
                window_s=cfg["w2_window_s"],
                reuse_max=cfg["celery_db_reuse_max"],
            ),
        ),
        (
            "W5",
            lambda: w5_memory_and_scale(
                bench, n_history=cfg["w5_n"], n_w1=cfg["w5_w1_n"], repeats=cfg["w5_repeats"]
            ),
        ),
    ]
    for name, step in steps:
        if only and name not in only:
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        t0 = time.time()
        try:
            bench.results[name] = step()
        except CorrectnessError as exc:
            bench.errors.append(f"{name}: correctness: {exc}")
        except Exception:
            traceback.print_exc()
            bench.errors.append(f"{name}: crashed: " + traceback.format_exc(limit=2))
        finally:
            bench.procs.stop_all()
        print(f"[{time.strftime('%H:%M:%S')}] {name} done in {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
