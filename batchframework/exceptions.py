"""Every error the library raises: one base class, never raised itself, and one class per failure.

Each class's docstring says when it is raised; the message says what to do about it.
"""

from __future__ import annotations

from django.core.exceptions import ValidationError


class BatchframeworkError(Exception):
    """Base class of every error raised by batchframework. Never raised itself."""


class InvalidOperationError(BatchframeworkError, ValueError):
    """Arguments that describe an operation are invalid; nothing was written."""


class OperationFieldsError(InvalidOperationError, ValidationError):
    """The manager's create methods were given field values the model refuses (a choice that
    does not exist, text too long, a number out of range, a naive datetime, a finished
    operation without a result...). Also a Django ``ValidationError``, with its
    ``message_dict``."""

    def __init__(self, error: ValidationError) -> None:
        ValidationError.__init__(self, error.message_dict)

    def __str__(self) -> str:
        problems = "; ".join(
            f"{field}: {' '.join(messages)}" for field, messages in self.message_dict.items()
        )
        return f"Invalid operation fields ({problems}); nothing was written."


class UnknownOperationTypeError(InvalidOperationError):
    """No handler is registered for the operationtype given to ``enqueue``."""


class InputDataError(InvalidOperationError):
    """``input_data`` is not JSON-serializable, or is larger than ``MAX_INPUT_BYTES``."""


class HandlerRegistrationError(BatchframeworkError):
    """A handler was registered twice for one operationtype, or with invalid options."""


class HandlerOutputError(BatchframeworkError, TypeError):
    """A handler returned a value that cannot be stored as JSON ``output_data``."""


class HandlerRolledBackError(BatchframeworkError):
    """An ``atomic=True`` handler returned, but left its transaction marked for rollback (it
    caught a database error raised inside it, instead of wrapping the statement that may fail
    in an ``atomic()`` block of its own). Its writes were rolled back, so the attempt failed."""


class OperationStateError(BatchframeworkError):
    """The operation is not in a state that allows the requested change."""
