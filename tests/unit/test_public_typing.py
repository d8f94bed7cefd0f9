"""What a type checker makes of ``from batchframework import …``: a misspelled name must be an
error, not ``Any``. Runs mypy's API on a small snippet (a second or two). No database needed."""

from __future__ import annotations

from pathlib import Path

import pytest

import batchframework

api = pytest.importorskip("mypy.api")

PACKAGE_INIT = Path(batchframework.__file__)


def mypy_errors(tmp_path: Path, source: str) -> list[str]:
    """mypy's error lines for ``source``, checked with the package's ``__init__.py`` only.

    The submodules are skipped (their names are ``Any``): what decides whether an unknown name
    is an error is ``__init__.py`` alone, and skipping the rest keeps this quick. No config
    file (the project's loads the django-stubs plugin) and no cache in the working tree.
    """
    snippet = tmp_path / "snippet.py"
    snippet.write_text(source)
    stdout, stderr, _ = api.run(
        [
            "--strict",
            "--config-file=",
            "--follow-imports=skip",
            f"--cache-dir={tmp_path / 'mypy_cache'}",
            str(snippet),
            str(PACKAGE_INIT),
        ]
    )
    assert not stderr, stderr
    return [line for line in stdout.splitlines() if ": error:" in line]


def test_a_misspelled_name_is_an_error(tmp_path):
    errors = mypy_errors(tmp_path, "from batchframework import enqeue\n")

    assert len(errors) == 1, errors
    assert 'Module "batchframework" has no attribute "enqeue"' in errors[0]


def test_every_public_name_is_known(tmp_path):
    names = ", ".join(batchframework.__all__)
    assert mypy_errors(tmp_path, f"from batchframework import {names}\n") == []


def test_lazy_names_still_import_at_runtime():
    from batchframework import BatchOperation, enqueue

    assert enqueue.__module__.startswith("batchframework.engine")
    assert BatchOperation.__name__ == "BatchOperation"
    with pytest.raises(AttributeError, match="enqeue"):
        batchframework.enqeue  # noqa: B018
