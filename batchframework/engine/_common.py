"""Small pieces shared by the engine modules."""

from __future__ import annotations

import os
import socket
import uuid
from datetime import timedelta

from django.db import router
from django.db.models import DateTimeField, DurationField, Expression, Value

from ..clock import now_expression
from ..models import BatchOperation

_HOSTNAME = socket.gethostname()


def write_alias(using: str | None = None) -> str:
    return using or router.db_for_write(BatchOperation)


def new_claim_token(worker: str | None = None) -> str:
    """A claim identity: who claims (host:pid unless given) and a fresh token per claim."""
    return f"{worker or f'{_HOSTNAME}:{os.getpid()}'}:{uuid.uuid4().hex[:12]}"[-255:]


def time_after(delta: timedelta, now: object = None) -> Expression:
    """``now + delta`` on the database clock (or the given ``now``)."""
    return _combine(now_expression(now), delta)  # type: ignore[arg-type]


def _combine(base: Expression, delta: timedelta) -> Expression:
    from django.db.models import ExpressionWrapper

    return ExpressionWrapper(
        base + Value(delta, output_field=DurationField()), output_field=DateTimeField()
    )


def supports_skip_locked(alias: str) -> bool:
    from django.db import connections

    return bool(connections[alias].features.has_select_for_update_skip_locked)
