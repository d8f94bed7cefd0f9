"""What a type checker sees of the public API: checked by ``make typecheck`` (mypy with the
django-stubs plugin), never run. A wrong or missing annotation fails the check here."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, assert_type

from batchframework import (
    BatchOperation,
    CancelOutcome,
    cancel,
    enqueue,
    enqueue_many,
    handler,
    postpone,
    set_progress,
)
from batchframework.models import BatchOperationQuerySet
from tests.testapp.models import Post


@handler("typecheck-example")
def example(operation: BatchOperation) -> dict[str, Any]:
    assert_type(operation.input_data, Any | None)
    assert_type(set_progress(operation, 1, 2, "half"), bool)
    assert_type(operation.set_progress(2, 2), bool)
    return {"ok": True}


def views(post: Post) -> None:
    operation = enqueue("typecheck-example", context_object=post, delay=timedelta(minutes=15))
    assert_type(operation, BatchOperation)
    assert_type(enqueue("typecheck-example", delay=30), BatchOperation)
    assert_type(enqueue_many("typecheck-example", [{"input_data": 1}]), list[BatchOperation])
    assert_type(cancel(operation), CancelOutcome)
    assert_type(postpone(operation, 60), bool)
    assert_type(operation.postpone(60), bool)
    assert_type(operation.cancel(), CancelOutcome)


def queries(post: Post) -> None:
    objects = BatchOperation.objects
    assert_type(objects.for_context_object(post), BatchOperationQuerySet)
    assert_type(objects.due().first(), BatchOperation | None)
    assert_type(objects.filter(operationtype="x").unprocessed(), BatchOperationQuerySet)
    assert_type(objects.create_asyncronous(operationtype="x"), BatchOperation)
    assert_type(objects.create_syncronous(operationtype="x"), BatchOperation)
    with objects.synchronous(operationtype="x") as running:
        assert_type(running, BatchOperation)


def misspelled_names() -> None:
    # A misspelled name from the flat API is an error, not ``Any``: the package's lazy
    # ``__getattr__`` is hidden from type checkers. With ``warn_unused_ignores`` the check
    # fails if this ignore is ever not needed.
    from batchframework import enqeue  # type: ignore[attr-defined]  # noqa: F401
