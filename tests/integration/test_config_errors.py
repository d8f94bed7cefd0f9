"""Configuration mistakes that once escaped the documented errors: an abstract dispatcher
(check E005, ``ImproperlyConfigured`` from ``enqueue``) and ``BATCHFRAMEWORK`` keys that are
not strings (check E002, ``ImproperlyConfigured`` at startup), rather than a bare
``TypeError``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

import pytest
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from batchframework import BatchOperation, enqueue
from batchframework.checks import check_settings
from batchframework.conf import get_settings
from batchframework.dispatch import Dispatcher, get_dispatcher
from tests.testapp.models import Post

from .helpers import ROOT

pytestmark = pytest.mark.timeout(60)


class MisspelledDispatcher(Dispatcher):
    """Implements ``dispath``, not ``dispatch``: still abstract."""

    def dispath(self, operations: Sequence[Any], *, using: str) -> None:
        raise AssertionError("never called")


ABSTRACT_DISPATCHERS = [
    "batchframework.dispatch.Dispatcher",
    f"{__name__}.MisspelledDispatcher",
]


def _with_dispatcher(path: str) -> dict[str, Any]:
    return {**settings.BATCHFRAMEWORK, "DISPATCHER": path}


@pytest.mark.parametrize("path", ABSTRACT_DISPATCHERS)
def test_an_abstract_dispatcher_fails_check_e005(path):
    with override_settings(BATCHFRAMEWORK=_with_dispatcher(path)):
        [error] = [m for m in check_settings() if m.id == "batchframework.E005"]
    assert path in error.msg
    assert "abstract" in error.msg and "dispatch" in error.msg
    assert error.hint


@pytest.mark.parametrize("path", ABSTRACT_DISPATCHERS)
def test_get_dispatcher_refuses_an_abstract_dispatcher(path):
    with (
        override_settings(BATCHFRAMEWORK=_with_dispatcher(path)),
        pytest.raises(ImproperlyConfigured, match="abstract Dispatcher subclass"),
    ):
        get_dispatcher()


@pytest.mark.django_db
@pytest.mark.parametrize("path", ABSTRACT_DISPATCHERS)
def test_enqueue_with_an_abstract_dispatcher_raises_before_it_writes(path):
    """Every enqueue raised a bare TypeError (can't instantiate an abstract class)."""
    post = Post.objects.create(title="t")
    with (
        override_settings(BATCHFRAMEWORK=_with_dispatcher(path)),
        pytest.raises(ImproperlyConfigured, match="does not implement dispatch"),
    ):
        enqueue("test-noop", context_object=post)
    assert BatchOperation.objects.count() == 0


NON_STRING_KEYS = [
    ({1: 2}, "Unknown key(s) in BATCHFRAMEWORK: 1."),
    # sorted() raised TypeError comparing str and int.
    ({"A": 1, 2: 3}, "Unknown key(s) in BATCHFRAMEWORK: 'A', 2."),
    ({("POLL_INTERVAL",): 1}, "Unknown key(s) in BATCHFRAMEWORK: ('POLL_INTERVAL',)."),
]


@pytest.mark.parametrize(("value", "message"), NON_STRING_KEYS)
def test_non_string_keys_are_listed_as_unknown(value, message):
    with override_settings(BATCHFRAMEWORK=value):
        with pytest.raises(ImproperlyConfigured) as excinfo:
            get_settings()
        assert message in str(excinfo.value)
        [error] = check_settings()
    assert error.id == "batchframework.E002"
    assert message in error.msg


def test_django_setup_refuses_a_non_string_key(tmp_path):
    """At startup too: ``django.setup()`` raised TypeError from ``', '.join``."""
    (tmp_path / "bad_key_settings.py").write_text(
        textwrap.dedent(
            """
            from tests.settings import *  # noqa: F403

            BATCHFRAMEWORK = {1: 2}
            """
        )
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "bad_key_settings",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)]),
    }
    result = subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("django.core.exceptions.ImproperlyConfigured: "), result.stderr
    assert "Unknown key(s) in BATCHFRAMEWORK: 1." in last_line
