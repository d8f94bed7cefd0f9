"""docker-compose.yml, checked without a Docker engine: the services exist with health checks,
and every command names a real module, management command and setting of this repository."""

from __future__ import annotations

import importlib.util
import re
import shlex
import tomllib
from functools import cache

import pytest
import yaml

from .helpers import REPOSITORY_ROOT, example_environment, run_manage

COMPOSE_FILE = REPOSITORY_ROOT / "docker-compose.yml"
PROJECT_DIR = REPOSITORY_ROOT / "example_project"
SETTINGS_FILE = PROJECT_DIR / "exampleproject" / "settings.py"


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())["services"]


@cache
def management_commands(tmp_dir: str) -> set[str]:
    from pathlib import Path

    result = run_manage("help", "--commands", env=example_environment(Path(tmp_dir)), timeout=60)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def command_lines(service: dict) -> list[list[str]]:
    """The service's command as argument lists (``sh -c "a && b"`` gives one list per part)."""
    command = service["command"]
    words = shlex.split(command) if isinstance(command, str) else list(command)
    if words[:2] == ["sh", "-c"]:
        return [shlex.split(part) for part in words[2].split("&&")]
    return [words]


def test_all_services_exist(services):
    assert {"db", "redis", "web", "worker", "beat"} <= set(services)


def test_db_and_redis_have_health_checks_that_app_services_wait_for(services):
    assert "pg_isready" in " ".join(services["db"]["healthcheck"]["test"])
    assert services["db"]["image"].startswith("postgres:16")
    assert "ping" in services["redis"]["healthcheck"]["test"]
    assert services["redis"]["image"].startswith("redis:7")
    assert services["web"]["depends_on"]["db"]["condition"] == "service_healthy"
    assert services["web"]["depends_on"]["redis"]["condition"] == "service_healthy"
    for name in ("worker", "beat"):
        assert services[name]["depends_on"]["web"]["condition"] == "service_healthy"


def test_app_services_are_built_from_the_example_dockerfile(services):
    extras = tomllib.loads((REPOSITORY_ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for name in ("web", "worker", "beat"):
        build = services[name]["build"]
        dockerfile = REPOSITORY_ROOT / build["context"] / build["dockerfile"]
        assert dockerfile.is_file()
        text = dockerfile.read_text()
        assert "FROM python:3.12-slim" in text
        for extra in re.search(r"\.\[([a-z,]+)\]", text).group(1).split(","):
            assert extra in extras


def test_every_manage_py_subcommand_exists(services, tmp_path):
    commands = management_commands(str(tmp_path))
    used = [
        line[2]
        for service in services.values()
        if "command" in service
        for line in command_lines(service)
        if line[:2] == ["python", "manage.py"]
    ]
    assert {"migrate", "batchframework_register_poller", "runserver"} <= set(used)
    for name in used:
        assert name in commands, name


def test_celery_commands_name_the_project_app_and_a_real_scheduler(services):
    for name, subcommand in (("worker", "worker"), ("beat", "beat")):
        (line,) = command_lines(services[name])
        assert line[:3] == ["celery", "-A", "exampleproject"]
        assert line[3] == subcommand
        assert (PROJECT_DIR / "exampleproject" / "celery.py").is_file()
        assert "celery_app" in (PROJECT_DIR / "exampleproject" / "__init__.py").read_text()
    (beat,) = command_lines(services["beat"])
    module, _, attribute = beat[beat.index("-S") + 1].partition(":")
    assert importlib.util.find_spec(module) is not None
    assert attribute == "DatabaseScheduler"
    (worker,) = command_lines(services["worker"])
    if "--queues" in worker:
        # The queue batchframework publishes to by default.
        assert worker[worker.index("--queues") + 1] == "default"


def test_every_environment_variable_is_read_by_the_settings(services):
    settings_source = SETTINGS_FILE.read_text()
    for name in ("web", "worker", "beat"):
        environment = services[name]["environment"]
        assert {"DATABASE_URL", "CELERY_BROKER_URL"} <= set(environment)
        for variable in environment:
            assert re.search(rf'os\.environ(\.get\(|\[)"{variable}"', settings_source), variable
    assert services["web"]["environment"]["DATABASE_URL"].startswith("postgres://")
    assert services["web"]["environment"]["CELERY_BROKER_URL"].startswith("redis://redis:")
