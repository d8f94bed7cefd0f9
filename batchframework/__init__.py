"""batchframework: tracked background and bulk operations for Django.

The flat public API::

    from batchframework import handler, enqueue, enqueue_many, BatchOperation

Names that need Django's app registry (the model and the engine) are imported lazily, so
``"batchframework"`` can be listed in ``INSTALLED_APPS`` before the registry is ready.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .registry import handler, registry

__version__ = "0.1.0"

_LAZY = {
    "BatchOperation": "batchframework.models",
    "enqueue": "batchframework.engine",
    "enqueue_many": "batchframework.engine",
    "cancel": "batchframework.engine",
    "cancel_many": "batchframework.engine",
    "postpone": "batchframework.engine",
    "set_progress": "batchframework.engine",
    "CancelOutcome": "batchframework.engine",
    "RunOutcome": "batchframework.engine",
}

if TYPE_CHECKING:
    from .engine import (
        CancelOutcome,
        RunOutcome,
        cancel,
        cancel_many,
        enqueue,
        enqueue_many,
        postpone,
        set_progress,
    )
    from .models import BatchOperation


if not TYPE_CHECKING:
    # Hidden from type checkers: a module-level ``__getattr__`` makes mypy treat every unknown
    # name imported from this package as ``Any``, so a typo (``from batchframework import
    # enqeue``) would type-check. The real names are declared in the block above instead.

    def __getattr__(name: str) -> Any:
        """Import the lazy names on first use (see the module docstring)."""
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module 'batchframework' has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)


__all__ = [
    "BatchOperation",
    "CancelOutcome",
    "RunOutcome",
    "__version__",
    "cancel",
    "cancel_many",
    "enqueue",
    "enqueue_many",
    "handler",
    "postpone",
    "registry",
    "set_progress",
]
