"""Validation of the JSON data an operation carries, before anything is written."""

from __future__ import annotations

import json
from typing import Any

from .exceptions import InputDataError

#: The deepest nesting of lists and dicts accepted: MariaDB's ``JSON_VALID`` check (its JSON
#: column) refuses 32 levels or more. Refused on every database, so that data a project stores
#: is portable, as NUL characters are (PostgreSQL refuses those).
MAX_DEPTH = 31


def _unstorable_part(value: Any) -> str | None:
    """Why ``value`` (already known to serialize) would not come back as it was stored, or
    would be refused by a supported database; ``None`` when it is fine."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list | tuple):
            depth += 1
            if depth > MAX_DEPTH:
                return (
                    f"it nests lists and dicts more than {MAX_DEPTH} levels deep "
                    "(MariaDB's JSON check refuses that)"
                )
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    return f"dict key {key!r} is not a string (JSON would turn it into one)"
                stack.append((key, depth))
                stack.append((child, depth))
        elif isinstance(item, list | tuple):
            stack.extend((child, depth) for child in item)
        elif isinstance(item, str):
            if "\x00" in item:
                return "a string contains a NUL character (PostgreSQL's jsonb refuses \\u0000)"
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "a string contains a lone surrogate (not valid Unicode text)"
    return None


def encode_json(value: Any, *, what: str = "input_data", max_bytes: int | None = None) -> str:
    """Return ``value`` as JSON text, or raise :class:`InputDataError` saying why it can't be.

    Only plain JSON is accepted (dicts with string keys, lists, strings, numbers, booleans,
    ``None``): what a handler reads back is then what was stored. (Tuples are taken as the
    lists JSON makes of them, and read back as lists. JSON has one number type;
    PostgreSQL's ``jsonb`` keeps numbers as decimals, so ``1e16`` may read back as the int
    ``10000000000000000`` — equal in value.) NaN and infinity are
    refused because PostgreSQL's ``jsonb`` refuses them, and so are strings holding NUL
    characters or lone surrogates, which PostgreSQL or MariaDB refuse, and lists and dicts
    nested more than :data:`MAX_DEPTH` levels deep, which MariaDB refuses.
    """
    try:
        text = json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise InputDataError(
            f"{what} must be JSON-serializable (dict, list, str, int, float, bool, None); "
            f"{exc}. Convert values such as datetimes, Decimals and UUIDs to strings first."
        ) from exc
    problem = _unstorable_part(value)
    if problem is not None:
        raise InputDataError(f"{what} can't be stored as JSON unchanged: {problem}.")
    if max_bytes is not None and len(text.encode()) > max_bytes:
        raise InputDataError(
            f"{what} is {len(text.encode())} bytes as JSON, more than the limit of {max_bytes} "
            "bytes (BATCHFRAMEWORK['MAX_INPUT_BYTES']). Store large data elsewhere and pass "
            "a reference to it."
        )
    return text
