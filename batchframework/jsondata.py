"""Validation of the JSON data an operation carries, before anything is written."""

from __future__ import annotations

import json
from typing import Any

from .exceptions import InputDataError


def encode_json(value: Any, *, what: str = "input_data", max_bytes: int | None = None) -> str:
    """Return ``value`` as JSON text, or raise :class:`InputDataError` saying why it can't be.

    Only plain JSON is accepted (dicts with string keys, lists, strings, numbers, booleans,
    ``None``): what a handler reads back is then exactly what was stored. NaN and infinity are
    refused because PostgreSQL's ``jsonb`` refuses them.
    """
    try:
        text = json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InputDataError(
            f"{what} must be JSON-serializable (dict, list, str, int, float, bool, None); "
            f"{exc}. Convert values such as datetimes, Decimals and UUIDs to strings first."
        ) from exc
    if max_bytes is not None and len(text.encode()) > max_bytes:
        raise InputDataError(
            f"{what} is {len(text.encode())} bytes as JSON, more than the limit of {max_bytes} "
            "bytes (BATCHFRAMEWORK['MAX_INPUT_BYTES']). Store large data elsewhere and pass "
            "a reference to it."
        )
    return text
