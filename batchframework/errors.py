"""How failures are recorded on an operation: the exception's type, message and traceback."""

from __future__ import annotations

import traceback
from typing import TypedDict


class ErrorDetails(TypedDict):
    type: str
    message: str
    traceback: str


def describe_exception(exc: BaseException) -> ErrorDetails:
    """A JSON-serializable description of ``exc``, stored in ``output_data["error"]``."""
    return {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
    }


def format_error(details: ErrorDetails) -> str:
    """One text for the ``last_error`` column: the traceback ends with type and message."""
    return details["traceback"] or f"{details['type']}: {details['message']}"
