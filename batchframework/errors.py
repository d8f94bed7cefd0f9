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
        "message": storable_text(_message_of(exc)),
        "traceback": storable_text("".join(traceback.format_exception(exc))),
    }


def _message_of(exc: BaseException) -> str:
    """``str(exc)``; an exception whose ``__str__`` raises (or returns no ``str``) must still be
    recorded, or its operation would stay running (the traceback module says the same)."""
    try:
        message = str(exc)
    except Exception:
        return "<exception str() failed>"
    return message


def storable_text(text: str) -> str:
    """``text`` with what no database stores written as escapes: NUL (refused by PostgreSQL's
    text and jsonb) and lone surrogates (not valid Unicode). An error message may hold either,
    and then recording the failure failed, leaving the operation running."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def format_error(details: ErrorDetails) -> str:
    """One text for the ``last_error`` column: the traceback ends with type and message."""
    return details["traceback"] or f"{details['type']}: {details['message']}"
