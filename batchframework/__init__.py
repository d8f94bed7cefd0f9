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
        enqueue,
        enqueue_many,
        postpone,
        set_progress,
    )
    from .models import BatchOperation


def __getattr__(name: str) -> Any:
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
    "enqueue",
    "enqueue_many",
    "handler",
    "postpone",
    "registry",
    "set_progress",
]
