"""The ``BatchOperation`` model: one row records one batch operation, sync or async.

It keeps the original ``ievv_batchframework`` API (``create_asyncronous``, ``mark_as_running``,
``finish``, ``input_data_json`` …) and adds the columns the engine needs to run operations
reliably (due time, attempts, lease, queue, priority, progress). Status changes made by workers
go through :mod:`batchframework.engine`; the model's own methods serve the manual flow of the
original and the synchronous bulk use case.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from django.conf import settings
from django.contrib.contenttypes.fields import GenericForeignKey
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import NON_FIELD_ERRORS, ValidationError
from django.db import DatabaseError, IntegrityError, connections, models, router, transaction
from django.db.models import Q
from django.db.models.deletion import Collector
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from .clock import STORABLE_RANGE, now_expression, storable
from .conf import get_settings
from .errors import describe_exception
from .exceptions import (
    InputDataError,
    InvalidOperationError,
    OperationFieldsError,
    OperationStateError,
)
from .jsondata import encode_json
from .registry import registry
from .signals import log_event

if TYPE_CHECKING:
    from .engine import CancelOutcome


def take_context_arguments(kwargs: dict[str, Any]) -> None:
    """Check the context object in creation arguments, and take a model instance passed as
    ``context_object_id`` (as the original's own example does) as the context object: what it
    meant, where a text column would otherwise store ``str(instance)``."""
    given = kwargs.get("context_object_id")
    if isinstance(given, models.Model):
        if kwargs.get("context_object") is not None:
            raise InvalidOperationError("Pass either context_object or context_object_id.")
        del kwargs["context_object_id"]
        kwargs["context_object"] = given
    parts = [
        name
        for name in ("context_content_type", "context_content_type_id", "context_object_id")
        if kwargs.get(name) is not None
    ]
    if kwargs.get("context_object") is not None:
        if parts:  # one of them would be dropped in silence
            raise InvalidOperationError(
                f"Pass either context_object or {' and '.join(parts)}, not both."
            )
        check_context_object(kwargs["context_object"])
    elif parts == ["context_object_id"]:
        raise InvalidOperationError(
            "context_object_id needs context_content_type (or pass context_object): an id "
            "alone names no object."
        )


def check_context_object(context_object: Any) -> None:
    if not isinstance(context_object, models.Model):
        raise InvalidOperationError(
            f"context_object must be a saved model instance, not {type(context_object).__name__}."
        )
    if context_object.pk is not None and len(str(context_object.pk)) > CONTEXT_ID_LENGTH:
        # A database would refuse it, or (PostgreSQL's cast in enqueue_many) cut it short
        # and point the operation at another object.
        raise InvalidOperationError(
            f"context_object's primary key is longer than {CONTEXT_ID_LENGTH} characters as "
            "text, which context_object_id can't hold."
        )
    if is_unsaved(context_object):
        raise InvalidOperationError(
            "context_object must be saved (it has no primary key yet, or no row has it)."
        )


def is_unsaved(instance: models.Model) -> bool:
    """Whether ``instance`` has no row. A primary key with a default (a UUID; a text key,
    ``""``) is set before the instance is saved, so such an instance built rather than read is
    looked up: one query, only for those. Any other is taken at its word: one read or saved,
    or built with a key of the caller's (``Post(pk=post_id)``, a reference that costs none)."""
    if instance.pk is None:
        return True
    if not instance._state.adding:
        return False
    key = instance._meta.pk
    if not (key.has_default() or instance.pk == ""):
        return False
    alias = instance._state.db or router.db_for_read(type(instance), instance=instance)
    return not type(instance)._base_manager.using(alias).filter(pk=instance.pk).exists()


#: The length of ``context_object_id``: a context object's primary key as text.
CONTEXT_ID_LENGTH = 255


#: Operations deleted per statement by :meth:`BatchOperationQuerySet.delete` once locked.
_DELETE_CHUNK = 500

#: Foreign keys, which ``clean_fields`` would check with a query each:
#: :func:`_check_cleaned` checks them without one when they were given as instances.
_NOT_CLEANED = ("started_by", "context_content_type")
#: Datetimes a caller may pass to the create methods (a naive one is ambiguous).
_DATETIME_FIELDS = (
    "created_datetime",
    "started_running_datetime",
    "finished_datetime",
    "run_after",
    "lease_expires_at",
)


def _take_json_text(kwargs: dict[str, Any], name: str, value: Any) -> Any:
    """The value of the JSON field ``name``, given as itself or as the original's JSON text
    (``<name>_json``), which is decoded here so that it is validated like the value."""
    text = kwargs.pop(f"{name}_json", None)
    if not text:
        return value
    if value is not None:
        raise InvalidOperationError(f"Pass either {name} or {name}_json, not both.")
    try:
        return json.loads(text)
    except (TypeError, ValueError) as exc:
        raise OperationFieldsError(
            ValidationError({f"{name}_json": [f"Must be JSON text: {exc}."]})
        ) from None


def _check_types(kwargs: dict[str, Any]) -> None:
    """Refuse values ``clean_fields`` would fail on with a bare ``TypeError`` (or, for
    ``operationtype``, the registry as unhashable)."""
    errors: dict[str, list[str]] = {}
    if not isinstance(kwargs.get("operationtype", ""), str):
        errors["operationtype"] = [f"Must be a string, not {kwargs['operationtype']!r}."]
    for name in _DATETIME_FIELDS:
        value = kwargs.get(name)
        if value is not None and not isinstance(value, datetime | str):
            errors[name] = [f"Must be a timezone-aware datetime, not {value!r}."]
    if errors:
        raise ValidationError(errors)


def _insert(operation: BatchOperation, alias: str | None) -> None:
    """Save the new ``operation``. A value another row holds (a ``debounce_key``, an ``id``)
    is refused by the database: in a savepoint when the caller is in a transaction, which it
    would break, and as :class:`OperationFieldsError` like every other refused value."""
    unique_given = operation.debounce_key or operation.pk is not None
    alias = alias or router.db_for_write(BatchOperation, instance=operation)
    if not (unique_given and connections[alias].in_atomic_block):
        guard: Any = contextlib.nullcontext()
    else:
        guard = transaction.atomic(using=alias)
    try:
        with guard:
            operation.save(force_insert=True, using=alias)
    except IntegrityError as exc:
        if not unique_given:
            raise
        raise OperationFieldsError(
            ValidationError(
                {NON_FIELD_ERRORS: [f"Another operation has this id or debounce_key: {exc}"]}
            )
        ) from None


def _check_cleaned(operation: BatchOperation, alias: str | None) -> None:
    """What ``clean_fields`` leaves to the database, which would refuse it with an error of its
    own or, in a caller's transaction, break that transaction: times it can't store, NUL in
    text, related objects that are unsaved or missing."""
    errors: dict[str, list[str]] = {}
    for name in _DATETIME_FIELDS:
        value = getattr(operation, name)
        if value is None:
            continue
        if timezone.is_naive(value):
            errors[name] = ["A naive datetime is ambiguous; pass a timezone-aware one."]
        elif not storable(value):
            errors[name] = [f"Must be {STORABLE_RANGE}."]
    for field in operation._meta.concrete_fields:
        value = getattr(operation, field.attname)
        if isinstance(value, str) and "\x00" in value:
            errors[field.name] = ["Text can't contain NUL characters."]
    for name in _NOT_CLEANED:
        key = operation._meta.get_field(name)
        assert isinstance(key, models.ForeignKey)
        if key.is_cached(operation):
            related = key.get_cached_value(operation)
            if related is not None and is_unsaved(related):
                errors[name] = ["Must be saved (it has no primary key yet, or no row has it)."]
        elif getattr(operation, key.attname) is not None:
            # Given as an id: one query, only then.
            target: type[models.Model] = key.related_model
            rows = target._default_manager.db_manager(alias)
            try:
                found = rows.filter(pk=getattr(operation, key.attname)).exists()
            except (TypeError, ValueError, ValidationError):  # not an id of that model
                found = False
            if not found:
                errors[name] = [f"No {target._meta.verbose_name} has this id."]
    if errors:
        raise ValidationError(errors)


class BatchOperationQuerySet(models.QuerySet["BatchOperation"]):
    """Filters named after what they mean."""

    def delete(self) -> tuple[int, dict[str, int]]:
        """Delete the operations this queryset selects, as they are when deleted.

        Django deletes in one statement when nothing points at the model, and its ``WHERE``
        then holds at the delete. Otherwise (a foreign key to ``BatchOperation``, a delete
        signal receiver) it reads the rows first and deletes them by id: a worker could claim
        an operation in between, and ``.unprocessed().delete()`` would delete a running one —
        a cancel that silently came too late (invariant 3). So in that case the rows are
        locked as they are read (re-checking the filter), and a claim skips them. Not when the
        filter is on an aggregate (``annotate(Count(...))``): databases lock no grouped rows.
        """
        locking = self.select_for_update()
        alias = locking.db  # for a write, as select_for_update() marks it
        if (
            self.query.is_sliced
            or cast(Any, self)._fields is not None  # after values(): Django's own error
            or Collector(using=alias, origin=self).can_fast_delete(self)
            # FOR UPDATE can't go with GROUP BY (PostgreSQL): a filter on an aggregate is
            # deleted as Django deletes it, unlocked.
            or self.query.group_by is not None
        ):
            return super().delete()
        if connections[alias].features.has_select_for_update_of:
            locking = self.select_for_update(of=("self",))  # not rows of joined tables
        # Nor can FOR UPDATE go with DISTINCT; a delete takes the same rows without it (Django
        # refuses distinct(*fields) before this).
        locking.query.distinct = False
        deleted, by_model = 0, Counter[str]()
        # A savepoint in a caller's transaction: a refused delete (a PROTECT key) leaves it
        # usable, as Django's own refusal before deleting does.
        with transaction.atomic(using=alias):
            pks = list(locking.using(alias).order_by("pk").values_list("pk", flat=True))
            # Django's delete of the locked rows (keeping this queryset's only() and the rest),
            # in chunks: it reads them again by id, and databases cap a query's parameters.
            for start in range(0, len(pks), _DELETE_CHUNK):
                chunk = self.using(alias).filter(pk__in=pks[start : start + _DELETE_CHUNK])
                count, counts = super(BatchOperationQuerySet, chunk).delete()
                deleted += count
                by_model.update(counts)
        return deleted, dict(by_model)

    def for_context_object(self, obj: models.Model) -> BatchOperationQuerySet:
        """Operations that concern ``obj`` (uses the context-object index)."""
        check_context_object(obj)
        content_type = ContentType.objects.db_manager(self.db).get_for_model(obj)
        return self.filter(context_content_type=content_type, context_object_id=str(obj.pk))

    def unprocessed(self) -> BatchOperationQuerySet:
        return self.filter(status=BatchOperation.STATUS_UNPROCESSED)

    def running(self) -> BatchOperationQuerySet:
        return self.filter(status=BatchOperation.STATUS_RUNNING)

    def finished(self) -> BatchOperationQuerySet:
        return self.filter(status=BatchOperation.STATUS_FINISHED)

    def successful(self) -> BatchOperationQuerySet:
        return self.filter(
            status=BatchOperation.STATUS_FINISHED, result=BatchOperation.RESULT_SUCCESSFUL
        )

    def failed(self) -> BatchOperationQuerySet:
        return self.filter(
            status=BatchOperation.STATUS_FINISHED, result=BatchOperation.RESULT_FAILED
        )

    def due(self, now: datetime | None = None) -> BatchOperationQuerySet:
        """Unprocessed operations whose ``run_after`` has come, judged by the database clock
        (or by ``now`` when given)."""
        return self.unprocessed().filter(run_after__lte=now_expression(now))

    def not_due(self, now: datetime | None = None) -> BatchOperationQuerySet:
        """Unprocessed operations that are still waiting for their ``run_after``."""
        return self.unprocessed().filter(run_after__gt=now_expression(now))

    def lease_expired(self, now: datetime | None = None) -> BatchOperationQuerySet:
        """Running operations whose claim has lapsed: their worker is presumed lost."""
        return self.running().filter(lease_expires_at__lt=now_expression(now))

    def running_unclaimed(self) -> BatchOperationQuerySet:
        """Running operations that no worker claimed: synchronous ones and those of the
        original manual flow (``mark_as_running()``). They have no lease, so nothing recovers
        them if their process dies; see :func:`batchframework.engine.fail_abandoned`."""
        return self.running().filter(lease_expires_at__isnull=True)


class _CreationMethods(models.Manager["BatchOperation"]):
    """The original's creation API and a context manager for synchronous work."""

    def _create_validated(self, input_data: Any, **kwargs: Any) -> BatchOperation:
        take_context_arguments(kwargs)
        input_data = _take_json_text(kwargs, "input_data", input_data)
        kwargs["output_data"] = _take_json_text(kwargs, "output_data", kwargs.get("output_data"))
        if input_data is not None:
            encode_json(input_data, max_bytes=get_settings().MAX_INPUT_BYTES)
        if kwargs["output_data"] is not None:
            encode_json(kwargs["output_data"], what="output_data")
        try:
            _check_types(kwargs)
            # Like enqueue's: workers that take only their queues must find it where they look.
            kwargs.setdefault("queue", registry.queue_for(kwargs.get("operationtype", "")))
            try:
                operation = self.model(**kwargs)
            except (TypeError, ValueError) as exc:  # an unknown field, a wrong related object
                raise ValidationError({NON_FIELD_ERRORS: [str(exc)]}) from None
            operation.input_data = input_data
            priority = kwargs.get("priority", 0)
            if isinstance(priority, bool) or not isinstance(priority, int):
                raise ValidationError({"priority": [f"Must be an integer, not {priority!r}."]})
            if not -32768 <= priority <= 32767:
                # A small integer column everywhere; SQLite would store any number.
                raise ValidationError(
                    {"priority": [f"Must be from -32768 to 32767, not {priority}."]}
                )
            operation.clean_fields(exclude=_NOT_CLEANED)
            _check_cleaned(operation, self._db)
            operation.clean()
        except ValidationError as exc:
            raise OperationFieldsError(exc) from None
        _insert(operation, self._db)
        return operation

    def create_asynchronous(self, input_data: Any = None, **kwargs: Any) -> BatchOperation:
        """Create an unprocessed operation for some asynchronous service to run.

        It is not dispatched, and nothing checks it is due or debounced as
        :func:`batchframework.enqueue` does. But a stored unprocessed operation is the database's
        word: if its ``operationtype`` has a registered handler, workers and the poller run it
        once its ``run_after`` has come (by default at once, within a poll interval). Without a
        handler it is left entirely to you. Unless ``queue`` is given, it stores the queue
        ``enqueue`` would: the handler's as routed, else ``ROUTES``, else ``DEFAULT_QUEUE``.
        A field value the model refuses raises
        :class:`~batchframework.exceptions.OperationFieldsError` and writes nothing.
        """
        kwargs.setdefault("status", BatchOperation.STATUS_UNPROCESSED)
        return self._create_validated(input_data, **kwargs)

    def create_synchronous(self, input_data: Any = None, **kwargs: Any) -> BatchOperation:
        """Create an operation that is already running, in one INSERT.

        Its id can tag rows made with ``bulk_create`` so that they can be fetched back. Validated
        like :meth:`create_asynchronous`.
        """
        kwargs.setdefault("status", BatchOperation.STATUS_RUNNING)
        now = timezone.now()  # one reading: it can't have started before it was created
        kwargs.setdefault("created_datetime", now)
        kwargs.setdefault("started_running_datetime", now)
        return self._create_validated(input_data, **kwargs)

    # The original's spellings, kept so code written for ievv_batchframework runs unchanged.
    create_asyncronous = create_asynchronous
    create_syncronous = create_synchronous

    @contextlib.contextmanager
    def synchronous(self, input_data: Any = None, **kwargs: Any) -> Iterator[BatchOperation]:
        """Run a block as a synchronous operation.

        On normal exit the operation is finished as successful (unless the block finished it);
        if the block raises, it is finished as failed with the error's type, message and
        traceback in ``output_data["error"]``, and the exception propagates.
        """
        operation = self.create_synchronous(input_data=input_data, **kwargs)
        try:
            yield operation
        except BaseException as exc:
            if operation.status != BatchOperation.STATUS_FINISHED:
                _record_failure(operation, exc)
            raise
        if operation.status != BatchOperation.STATUS_FINISHED:
            try:
                operation.finish()
            except InputDataError as exc:  # output_data the block assigned can't be stored
                _record_failure(operation, exc)
                raise


def _record_failure(operation: BatchOperation, exc: BaseException) -> None:
    """Finish ``operation`` as failed by ``exc``, if the database still lets us: the block's
    error may have broken the transaction (an ``IntegrityError`` in ``atomic()``), and then the
    caller must see that error, not ours. Its rollback takes the operation's row with it."""
    try:
        operation.finish(failed=True, output_data={"error": describe_exception(exc)})
    except DatabaseError as finish_error:
        log_event(
            logging.WARNING,
            "synchronous_failure_not_recorded",
            operation_id=operation.pk,
            reason=repr(finish_error),
        )


#: ``BatchOperation.objects``: the original's creation API, a context manager for synchronous
#: work, and every :class:`BatchOperationQuerySet` filter. Built with ``from_queryset`` at module
#: level, the form type checkers (django-stubs) understand.
BatchOperationManager = _CreationMethods.from_queryset(
    BatchOperationQuerySet, "BatchOperationManager"
)
# Found here, where deconstruct() (a subclass with ``use_in_migrations``) looks for it.
BatchOperationManager.__module__ = __name__


#: The partial indexes that serve MySQL/MariaDB too, which build them without their condition:
#: there migration 0004 leads the claim's index with ``status`` instead, and the other two
#: index columns that are NULL outside the status their condition names.
WITHOUT_CONDITION_TOO = frozenset(
    {"batchop_ready_idx", "batchop_lease_idx", "batchop_finished_idx"}
)


class BatchOperation(models.Model):
    """One batch operation: what it is, what it concerns, who started it, how it went."""

    STATUS_UNPROCESSED = "unprocessed"
    STATUS_RUNNING = "running"
    STATUS_FINISHED = "finished"
    STATUS_CHOICES = [
        (STATUS_UNPROCESSED, _("unprocessed")),
        (STATUS_RUNNING, _("running")),
        (STATUS_FINISHED, _("finished")),
    ]

    RESULT_NOT_AVAILABLE = "not-available"
    RESULT_SUCCESSFUL = "successful"
    RESULT_FAILED = "failed"
    RESULT_CHOICES = [
        (RESULT_NOT_AVAILABLE, _("not available yet (not finished)")),
        (RESULT_SUCCESSFUL, _("successful")),
        (RESULT_FAILED, _("failed")),
    ]

    #: Who started the operation, if anyone.
    started_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        verbose_name=_("started by"),
    )
    #: When the row was created.
    created_datetime = models.DateTimeField(_("created"), default=timezone.now)
    #: When the operation started running (set when it is claimed or marked as running).
    started_running_datetime = models.DateTimeField(_("started running"), null=True, blank=True)
    #: When the operation finished.
    finished_datetime = models.DateTimeField(_("finished"), null=True, blank=True)
    context_content_type = models.ForeignKey(
        ContentType,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="+",
        verbose_name=_("context object type"),
        # ``batchop_context_idx`` (content type, object id) serves every lookup by content type;
        # an index of its own would only cost a write per INSERT and per claim and finish.
        db_index=False,
    )
    #: Text, so objects with integer, UUID and string primary keys all fit. NULL (not "") when
    #: there is no context object, as the generic foreign key expects.
    context_object_id = models.CharField(  # noqa: DJ001
        _("context object id"), max_length=CONTEXT_ID_LENGTH, null=True, blank=True
    )
    #: The object this operation concerns (a generic foreign key).
    context_object = GenericForeignKey("context_content_type", "context_object_id")
    #: What kind of operation this is; the key of its handler in the registry. (On PostgreSQL,
    #: migration 0003 drops the ``varchar_pattern_ops`` index Django adds beside this field's
    #: index, and beside ``debounce_key``'s unique index: no query matches them by prefix.)
    operationtype = models.CharField(
        _("operation type"), max_length=255, blank=True, default="", db_index=True
    )
    status = models.CharField(
        _("status"), max_length=12, choices=STATUS_CHOICES, default=STATUS_UNPROCESSED
    )
    result = models.CharField(
        _("result"), max_length=13, choices=RESULT_CHOICES, default=RESULT_NOT_AVAILABLE
    )
    #: Input for the handler, stored as native JSON.
    input_data = models.JSONField(_("input data"), null=True, blank=True)
    #: What the operation produced (the handler's return value), or ``{"error": …}``.
    output_data = models.JSONField(_("output data"), null=True, blank=True)

    # --- Columns the engine uses to run operations. ---------------------------------------
    #: Not run before this time (judged by the database clock).
    run_after = models.DateTimeField(_("run after"), default=timezone.now)
    #: The queue workers take it from.
    queue = models.CharField(_("queue"), max_length=100, default="default")
    #: Higher runs first among due operations.
    priority = models.SmallIntegerField(_("priority"), default=0)
    #: How many times a worker has claimed it.
    attempts = models.PositiveIntegerField(_("attempts"), default=0)
    #: Until when the current claim holds; after it another worker may recover the operation.
    lease_expires_at = models.DateTimeField(_("lease expires"), null=True, blank=True)
    #: Identifies the current claim (worker and claim token); fences the finish.
    claimed_by = models.CharField(_("claimed by"), max_length=255, blank=True, default="")
    #: Type, message and traceback of the last failed attempt.
    last_error = models.TextField(_("last error"), blank=True, default="")
    progress_done = models.PositiveBigIntegerField(_("progress done"), null=True, blank=True)
    progress_total = models.PositiveBigIntegerField(_("progress total"), null=True, blank=True)
    progress_message = models.CharField(
        _("progress message"), max_length=255, blank=True, default=""
    )
    #: Set while an operation enqueued with ``replace=True`` is pending: at most one pending
    #: operation per operationtype and context object, enforced by the unique index.
    debounce_key = models.CharField(max_length=64, null=True, blank=True, unique=True)

    objects = BatchOperationManager()

    class Meta:
        verbose_name = _("batch operation")
        verbose_name_plural = _("batch operations")
        ordering = ["-created_datetime", "-id"]
        indexes = [
            models.Index(
                fields=["context_content_type", "context_object_id"],
                name="batchop_context_idx",
            ),
            # Matches the claim query: unprocessed, ordered by priority, due time, then id. The
            # id makes the order complete, so a claim reads only its batch even when thousands
            # of operations share a due time (enqueue_many with one run_after).
            models.Index(
                fields=["-priority", "run_after", "id"],
                name="batchop_ready_idx",
                condition=Q(status="unprocessed"),
            ),
            # Matches lease recovery.
            models.Index(
                fields=["lease_expires_at"],
                name="batchop_lease_idx",
                condition=Q(status="running"),
            ),
            # Matches pruning of old finished operations.
            models.Index(
                fields=["finished_datetime"],
                name="batchop_finished_idx",
                condition=Q(status="finished"),
            ),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(status__in=["unprocessed", "running", "finished"]),
                name="batchop_status_valid",
            ),
            models.CheckConstraint(
                condition=Q(result__in=["not-available", "successful", "failed"]),
                name="batchop_result_valid",
            ),
            models.CheckConstraint(
                condition=~Q(status="finished") | ~Q(result="not-available"),
                name="batchop_finished_has_result",
            ),
            models.CheckConstraint(
                condition=Q(status="unprocessed") | Q(started_running_datetime__isnull=False),
                name="batchop_started_has_datetime",
            ),
        ]

    def __str__(self) -> str:
        label = self.operationtype or "batch operation"
        text = f"{label} #{self.pk} ({self.status}"
        if self.status == self.STATUS_FINISHED:
            text += f", {self.result}"
        return text + ")"

    # --- Validation. --------------------------------------------------------------------------
    def save(self, *args: Any, **kwargs: Any) -> None:
        self.take_context_object_id_instance()
        if self.status != self.STATUS_UNPROCESSED and self.started_running_datetime is None:
            # The original's manual flow (``status = STATUS_RUNNING; save()``, as in the seed's
            # example) never set the start time; record it so the row satisfies the
            # ``batchop_started_has_datetime`` constraint instead of failing with an
            # IntegrityError.
            self.started_running_datetime = timezone.now()
            if kwargs.get("update_fields") is not None:
                kwargs["update_fields"] = {*kwargs["update_fields"], "started_running_datetime"}
        update_fields = kwargs.get("update_fields")
        if self.status != self.STATUS_UNPROCESSED and (
            update_fields is None or "status" in update_fields
        ):
            # No longer pending: free the debounce key, as a claim does, or every later
            # ``enqueue(replace=True)`` for this operationtype and object would collide with it.
            self.debounce_key = None
            if update_fields is not None:
                kwargs["update_fields"] = {*update_fields, "debounce_key"}
        super().save(*args, **kwargs)

    @classmethod
    def check(cls, **kwargs: Any) -> list[Any]:
        """Django's checks, without ``models.W037`` ("MySQL does not support indexes with
        conditions") while every partial index is one of :data:`WITHOUT_CONDITION_TOO`, which
        serve MySQL/MariaDB as well. Every MySQL project would otherwise have to silence it."""
        errors = super().check(**kwargs)
        partial = {index.name for index in cls._meta.indexes if index.condition is not None}
        if partial <= WITHOUT_CONDITION_TOO:
            errors = [error for error in errors if error.id != "models.W037"]
        return errors

    def clean(self) -> None:
        """The original's two rules: a finished operation has a result; a running or finished
        operation has ``started_running_datetime``."""
        self.take_context_object_id_instance()
        errors: dict[str, str] = {}
        if self.status == self.STATUS_FINISHED and self.result == self.RESULT_NOT_AVAILABLE:
            errors["result"] = "Must be specified when status is finished."
        if self.status != self.STATUS_UNPROCESSED and not self.started_running_datetime:
            errors["started_running_datetime"] = (
                "Can not be None when status is running or finished."
            )
        if errors:
            raise ValidationError(errors)

    def take_context_object_id_instance(self) -> None:
        """Take a model instance assigned to ``context_object_id`` (as the original's example
        does) as the context object: its content type and primary key."""
        given = self.context_object_id
        if isinstance(given, models.Model):
            check_context_object(given)
            self.context_object = given
            self.context_object_id = str(given.pk)

    # --- JSON text compatibility with the original's *_json fields. -------------------------
    @property
    def input_data_json(self) -> str:
        """``input_data`` as JSON text (``""`` when there is none), as the original stored it."""
        return "" if self.input_data is None else json.dumps(self.input_data)

    @input_data_json.setter
    def input_data_json(self, value: str) -> None:
        self.input_data = json.loads(value) if value else None

    @property
    def output_data_json(self) -> str:
        """``output_data`` as JSON text (``""`` when there is none)."""
        return "" if self.output_data is None else json.dumps(self.output_data)

    @output_data_json.setter
    def output_data_json(self, value: str) -> None:
        self.output_data = json.loads(value) if value else None

    # --- The original's manual flow. ----------------------------------------------------------
    def mark_as_running(self) -> None:
        """Mark the operation as running now and save it (the original's manual flow).

        Raises :class:`~batchframework.exceptions.OperationStateError` for an operation this
        instance knows is finished: running it again would leave a row both running and
        finished (with its result), which the abandoned-operation tools take for a live one;
        and for one a worker has claimed (inside a handler: the worker runs it already)."""
        self._refuse_when_finished("marked as running")
        self._refuse_when_claimed("marked as running")
        self.status = self.STATUS_RUNNING
        self.started_running_datetime = timezone.now()
        self.clean()
        self.save(update_fields=["status", "started_running_datetime"])

    def finish(self, failed: bool = False, output_data: Any = None) -> None:
        """Mark the operation as finished, successful unless ``failed``, and save it.

        Raises :class:`~batchframework.exceptions.OperationStateError` for an operation this
        instance knows is finished: a second outcome would keep the first's output (a success
        that still reports the failure's error). An instance whose row was finished by someone
        else meanwhile (``fail_abandoned``) records its outcome over theirs. An operation a
        worker has claimed (the instance a handler is given) is refused too: the handler
        returns its output, or raises, and the worker records it."""
        self._refuse_when_finished("finished again")
        self._refuse_when_claimed("finished by hand")
        output = self.output_data if output_data is None else output_data
        if output is not None:  # passed, or assigned before the call
            # Before it is kept: a refused value must not fail every later finish() too.
            encode_json(output, what="output_data")
        self.output_data = output
        self.status = self.STATUS_FINISHED
        self.result = self.RESULT_FAILED if failed else self.RESULT_SUCCESSFUL
        self.finished_datetime = timezone.now()
        if not self.started_running_datetime:
            self.started_running_datetime = self.finished_datetime
        self.clean()
        self.save(
            update_fields=[
                "status",
                "result",
                "finished_datetime",
                "started_running_datetime",
                "output_data",
            ]
        )

    def _refuse_when_finished(self, change: str) -> None:
        if self.status == self.STATUS_FINISHED:
            raise OperationStateError(
                f"Operation #{self.pk} is finished ({self.result}) and can't be {change}; "
                "create a new operation for another run."
            )

    def _refuse_when_claimed(self, change: str) -> None:
        # The engine finishes what it claimed, fenced by the claim; a row finished under it by
        # hand fails that fence, which then reads as a lost lease: the handler's work rolled
        # back (atomic handlers) or its success never announced.
        from .engine._common import ISOLATED  # the mark recovery leaves: no claim

        if self.status == self.STATUS_RUNNING and self.claimed_by not in ("", ISOLATED):
            raise OperationStateError(
                f"Operation #{self.pk} is being run by a worker (claimed by "
                f"{self.claimed_by}) and can't be {change}: a handler returns its output, or "
                "raises to fail, and the worker records the outcome."
            )

    # --- Engine operations, as methods for convenience. ---------------------------------------
    def cancel(self) -> CancelOutcome:
        """Make sure this operation never runs, if it has not started; see
        :func:`batchframework.engine.cancel`."""
        from .engine import cancel

        return cancel(self)

    def postpone(
        self, delay: timedelta | float | None = None, *, run_after: datetime | None = None
    ) -> bool:
        """Move a pending operation's due time; see :func:`batchframework.engine.postpone`."""
        from .engine import postpone

        return postpone(self, delay, run_after=run_after)

    def set_progress(self, done: int, total: int | None = None, message: str | None = None) -> bool:
        """Record progress from inside a handler (durable, and it renews the lease).

        Returns ``False`` when the operation no longer runs under this claim; see
        :func:`batchframework.engine.set_progress`.
        """
        from .engine import set_progress

        return set_progress(self, done, total=total, message=message)

    @property
    def progress(self) -> float | None:
        """Fraction done (0.0 to 1.0) when both progress figures are known."""
        if self.progress_done is None or not self.progress_total:
            return None
        return min(1.0, self.progress_done / self.progress_total)

    @property
    def error(self) -> dict[str, str] | None:
        """The recorded error of a failed operation (``output_data["error"]``), if any."""
        if isinstance(self.output_data, dict):
            error = self.output_data.get("error")
            if isinstance(error, dict):
                return error
        return None
