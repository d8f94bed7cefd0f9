"""The signed-in user's operations, as a page and as JSON for front-ends that poll.

A user sees only operations they started; staff see all. Anyone else gets 404, not 403, so
operation ids reveal nothing about other users' work.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth.decorators import login_required
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render

from batchframework import BatchOperation

#: Beyond any bigint primary key: such ids are malformed, not merely unknown.
MAX_ID = 2**63 - 1


def visible_operations(user: Any) -> QuerySet[BatchOperation]:
    """The operations ``user`` may see: their own, or all for staff."""
    operations = BatchOperation.objects.select_related("started_by", "context_content_type")
    if user.is_staff:
        return operations
    return operations.filter(started_by=user)


def operation_as_json(operation: BatchOperation, *, include_output: bool) -> dict[str, Any]:
    """What a polling front-end needs. ``output_data`` only for the operation's owner."""

    def iso(value: Any) -> str | None:
        return value.isoformat() if value else None

    data: dict[str, Any] = {
        "id": operation.pk,
        "operationtype": operation.operationtype,
        "status": operation.status,
        "result": operation.result,
        "run_after": iso(operation.run_after),
        "started": iso(operation.started_running_datetime),
        "finished": iso(operation.finished_datetime),
        "progress_done": operation.progress_done,
        "progress_total": operation.progress_total,
        "progress_message": operation.progress_message,
    }
    if include_output:
        data["output_data"] = operation.output_data
    return data


@login_required
def operation_list(request: HttpRequest) -> HttpResponse:
    operations = visible_operations(request.user).order_by("-run_after", "-id")[:200]
    return render(request, "operations/operation_list.html", {"operations": operations})


@login_required
def operation_detail(request: HttpRequest, pk: int) -> JsonResponse:
    if pk > MAX_ID:
        raise Http404("No such operation.")
    operation = visible_operations(request.user).filter(pk=pk).first()
    if operation is None:
        raise Http404("No such operation.")
    is_owner = operation.started_by_id == request.user.pk
    return JsonResponse(operation_as_json(operation, include_output=is_owner))
