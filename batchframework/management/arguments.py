"""Command-line arguments the management commands share, checked by argparse itself: a wrong
value stops the command with a usage message (exit code 2) before it touches anything."""

from __future__ import annotations

import argparse

from django.core.management.base import CommandParser
from django.db import connections

from ..conf import MAX_QUEUE_LENGTH


def queue_name(value: str) -> str:
    """``--queue``'s type: a queue name as the ``queue`` column stores it."""
    if not 0 < len(value) <= MAX_QUEUE_LENGTH:
        raise argparse.ArgumentTypeError(f"a queue name has 1-{MAX_QUEUE_LENGTH} characters")
    return value


def add_database_argument(parser: CommandParser, help: str) -> None:
    """``--database``, one of the aliases in ``DATABASES`` (as Django's own commands do)."""
    parser.add_argument("--database", default=None, choices=tuple(connections), help=help)
