"""Admin for batch operations: read-only, with pretty JSON and a link to the context object."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, cast

from django.contrib import admin, messages
from django.contrib.admin.utils import flatten_fieldsets, quote
from django.contrib.auth import get_permission_codename, get_user_model
from django.core.exceptions import ValidationError
from django.db import router, transaction
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest, HttpResponseRedirect
from django.urls import NoReverseMatch, reverse
from django.utils.html import format_html
from django.utils.translation import gettext_lazy as _

from .engine import CancelOutcome, cancel_many, fail_abandoned
from .models import BatchOperation, BatchOperationQuerySet

if TYPE_CHECKING:
    from django.utils.functional import _StrOrPromise as StrOrPromise

# What the delete page tells the user when the engine refused to cancel a pending operation.
_CANCEL_REFUSED_MESSAGES = {
    CancelOutcome.TOO_LATE_RUNNING: _(
        "Operation #%(id)s started running before it could be cancelled, so it was not "
        "deleted: a running operation can't be cancelled."
    ),
    CancelOutcome.TOO_LATE_FINISHED: _(
        "Operation #%(id)s ran and finished before it could be cancelled, so it was not deleted."
    ),
    CancelOutcome.NOT_FOUND: _("Operation #%(id)s was already cancelled or deleted."),
}

# Why a pending operation the delete view read can no longer be cancelled, by what its row holds
# now (``None``: the row is gone), as the engine's cancel() would answer.
_REFUSAL_BY_STATUS = {
    None: CancelOutcome.NOT_FOUND,
    BatchOperation.STATUS_RUNNING: CancelOutcome.TOO_LATE_RUNNING,
    BatchOperation.STATUS_FINISHED: CancelOutcome.TOO_LATE_FINISHED,
}

# What the delete page says, instead of a bare 403, to a user who may delete operations and
# reached the page of one that runs (a stale link: it was pending when their page loaded).
_RUNNING_NOT_DELETED = _(
    "Operation #%(id)s is running, so it can't be deleted: a running operation can't be cancelled."
)


class _CancelRefused(Exception):
    """Raised when a pending operation the delete view read can no longer be cancelled: by
    ``log_deletions``, before Django logs the deletion, or by ``delete_model`` if the engine
    refuses all the same. It rolls back the delete view's transaction."""

    def __init__(self, operation: BatchOperation, outcome: CancelOutcome) -> None:
        super().__init__(outcome.value)
        self.operation = operation
        self.outcome = outcome


def _pretty_json(value: Any) -> str:
    if value is None:
        return "-"
    # Text as written (not \u escapes): names, messages and paths are for people to read.
    text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)
    return format_html("<pre>{}</pre>", text)


@admin.register(BatchOperation)
class BatchOperationAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "operationtype",
        "status",
        "result",
        "context_link",
        "started_by",
        "created_datetime",
        "run_after",
        "started_running_datetime",
        "finished_datetime",
        "attempts",
        "queue",
    )
    # A date filter rather than ``date_hierarchy``: the hierarchy converts time zones in SQL,
    # which MySQL/MariaDB can do only with their time zone tables loaded (often they aren't,
    # and the changelist then fails); this filter computes its bounds in Python.
    list_filter = (
        "status",
        "result",
        "operationtype",
        "queue",
        # The content types in use, not every model of the project.
        ("context_content_type", admin.RelatedOnlyFieldListFilter),
        "created_datetime",
    )
    # The table holds every operation ever run: no COUNT(*) of all of it beside the filtered
    # one, and the newest first by the primary key's index (created_datetime has none).
    show_full_result_count = False
    ordering = ("-id",)
    search_fields = (
        "=id",
        "operationtype",
        "context_object_id",
        "last_error",
    )
    list_select_related = ("started_by", "context_content_type")
    actions = ["cancel_selected", "delete_finished_selected", "fail_abandoned_selected"]
    fieldsets = (
        (None, {"fields": ("operationtype", "status", "result", "context_link", "started_by")}),
        (
            _("Times"),
            {
                "fields": (
                    "created_datetime",
                    "run_after",
                    "started_running_datetime",
                    "finished_datetime",
                )
            },
        ),
        (
            _("Execution"),
            {
                "fields": (
                    "queue",
                    "priority",
                    "attempts",
                    "claimed_by",
                    "lease_expires_at",
                    "progress_display",
                )
            },
        ),
        (_("Data"), {"fields": ("input_data_pretty", "output_data_pretty", "last_error_pretty")}),
    )
    # Everything shown is read-only: status belongs to the engine.
    readonly_fields = flatten_fieldsets(fieldsets)

    def get_search_fields(self, request: HttpRequest) -> tuple[str, ...]:
        # The user model's own name field: a custom user model may have no ``username``.
        return (*self.search_fields, f"started_by__{get_user_model().USERNAME_FIELD}")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Viewing needs view/change permission; nothing is editable (status is the engine's).
        return False

    def has_abandon_permission(self, request: HttpRequest) -> bool:
        # Recording an outcome is a change, though the change form edits nothing.
        opts = self.opts
        codename = get_permission_codename("change", opts)
        return request.user.has_perm(f"{opts.app_label}.{codename}")

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # A running operation is never deleted from under its worker (cancel is refused too).
        if obj is not None and obj.status == BatchOperation.STATUS_RUNNING:
            return False
        return super().has_delete_permission(request, obj)

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        # Django's bulk "delete selected" would delete running operations; cancel_selected and
        # delete_finished_selected replace it.
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)
        return actions

    def delete_view(
        self, request: HttpRequest, object_id: str, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        running = self._running_to_refuse(request, object_id)
        if running is not None:
            self.message_user(request, _RUNNING_NOT_DELETED % {"id": running.pk}, messages.ERROR)
            return self._redirect("change", [quote(running.pk)])
        try:
            return super().delete_view(request, object_id, extra_context)
        except _CancelRefused as refused:
            # Nothing was deleted or logged; say why instead of "deleted successfully".
            operation, outcome = refused.operation, refused.outcome
            message = _CANCEL_REFUSED_MESSAGES[outcome] % {"id": operation.pk}
            self.message_user(request, message, messages.ERROR)
            if outcome is CancelOutcome.NOT_FOUND:  # no page of its own left to go back to
                return self._redirect("changelist", [])
            return self._redirect("change", [quote(operation.pk)])

    def _running_to_refuse(self, request: HttpRequest, object_id: str) -> BatchOperation | None:
        """The running operation ``object_id``, when the user may delete operations and see
        this one: the delete page then says why it deletes nothing. Anyone else gets Django's
        answer (403 or 404), as before."""
        if not self.has_delete_permission(request):
            return None
        operation = self.get_object(request, object_id)  # None for a malformed id too
        if operation is None or operation.status != BatchOperation.STATUS_RUNNING:
            return None
        if not self.has_view_or_change_permission(request, operation):
            return None
        return operation

    def _redirect(self, view: str, args: list[Any]) -> HttpResponseRedirect:
        opts = self.opts
        url = reverse(
            f"admin:{opts.app_label}_{opts.model_name}_{view}",
            args=args,
            current_app=self.admin_site.name,
        )
        return HttpResponseRedirect(url)

    def log_deletions(self, request: HttpRequest, queryset: Any) -> Any:
        # Django logs a deletion before delete_model, on LogEntry's own database: when a router
        # keeps the operations elsewhere, that entry is outside the delete view's transaction,
        # and a refusal raised later would not roll it back. So decide first, then log.
        for operation in queryset:
            self._hold_pending(operation)
        return super().log_deletions(request, queryset)

    def _hold_pending(self, operation: BatchOperation) -> None:
        """Lock the row of ``operation``, pending when the view read it, where ``cancel()``
        will delete it, so that no worker claims it before ``delete_model`` cancels it (the
        lock lasts as long as the delete view's transaction). Raise ``_CancelRefused`` now if
        it is no longer pending."""
        if operation.status != BatchOperation.STATUS_UNPROCESSED:
            return
        alias = router.db_for_write(BatchOperation, instance=operation)  # as cancel() asks
        # No savepoint: inside the view's transaction the lock must outlive this block. On a
        # database with no row locks (SQLite) delete_model's own refusal remains the guard.
        with transaction.atomic(using=alias, savepoint=False):
            rows = BatchOperation.objects.db_manager(alias).select_for_update()
            status = rows.filter(pk=operation.pk).values_list("status", flat=True).first()
        if status != BatchOperation.STATUS_UNPROCESSED:
            raise _CancelRefused(operation, _REFUSAL_BY_STATUS[status])

    def delete_model(self, request: HttpRequest, obj: BatchOperation) -> None:
        if obj.status == BatchOperation.STATUS_UNPROCESSED:
            # Pending when the view read it, and locked since (log_deletions): the engine
            # cancels atomically. Should it refuse all the same (no lock held, as on SQLite),
            # raising rolls back the view's transaction.
            outcome = obj.cancel()
            if not outcome:
                raise _CancelRefused(obj, outcome)
        elif obj.status == BatchOperation.STATUS_FINISHED:
            super().delete_model(request, obj)

    def response_action(self, request: HttpRequest, queryset: QuerySet[Any], *args: Any) -> Any:
        # Malformed ids in a forged action POST are the client's error, not a server error.
        try:
            return super().response_action(request, queryset, *args)
        except (ValueError, ValidationError):
            return HttpResponseBadRequest("Malformed selection.")

    @admin.display(description=_("context object"))
    def context_link(self, obj: BatchOperation) -> str:
        content_type = obj.context_content_type
        if content_type is None:
            return "-"
        label = f"{content_type.app_label}.{content_type.model} #{obj.context_object_id}"
        try:
            url = reverse(
                f"admin:{content_type.app_label}_{content_type.model}_change",
                # Quoted as the admin quotes keys in its own links (a text key may hold "/"
                # or "_"), on this admin site.
                args=[quote(obj.context_object_id or "")],
                current_app=self.admin_site.name,
            )
        except NoReverseMatch:
            return label
        return format_html('<a href="{}">{}</a>', url, label)

    @admin.display(description=_("progress"))
    def progress_display(self, obj: BatchOperation) -> str:
        if obj.progress_done is None:
            return "-"
        total = f" / {obj.progress_total}" if obj.progress_total is not None else ""
        message = f" — {obj.progress_message}" if obj.progress_message else ""
        return f"{obj.progress_done}{total}{message}"

    @admin.display(description=_("input data"))
    def input_data_pretty(self, obj: BatchOperation) -> str:
        return _pretty_json(obj.input_data)

    @admin.display(description=_("output data"))
    def output_data_pretty(self, obj: BatchOperation) -> str:
        return _pretty_json(obj.output_data)

    @admin.display(description=_("last error"))
    def last_error_pretty(self, obj: BatchOperation) -> str:
        # A failed synchronous operation records its error in output_data only.
        text = obj.last_error or (obj.error or {}).get("traceback")
        return format_html("<pre>{}</pre>", text) if text else "-"

    @admin.action(description=_("Cancel selected pending operations"), permissions=["delete"])
    def cancel_selected(self, request: HttpRequest, queryset: QuerySet[BatchOperation]) -> None:
        pending = queryset.filter(status=BatchOperation.STATUS_UNPROCESSED)
        if self._refused_cascade(request, pending, _("cancelling the selected operations")):
            return
        selected = queryset.count()
        operations = {operation.pk: operation for operation in pending}
        cancelled = [operations[pk] for pk in cancel_many(operations.values())]
        # Logged as the delete page logs a cancel: what was deleted, by whom.
        admin.ModelAdmin.log_deletions(self, request, cast(Any, cancelled))
        self.message_user(
            request,
            _("Cancelled %(n)d operation(s); %(m)d were running or finished (too late to cancel).")
            % {"n": len(cancelled), "m": selected - len(cancelled)},
            messages.INFO,
        )

    def _refused_cascade(
        self, request: HttpRequest, operations: QuerySet[BatchOperation], doing: StrOrPromise
    ) -> bool:
        """Refuse (with a message) to delete ``operations`` when rows that cascade from them
        need a delete permission the user lacks (for models with an admin) or are protected,
        as Django's own "delete selected" does. A cancel deletes, and cascades, too."""
        _objects, _counts, perms_needed, protected = self.get_deleted_objects(operations, request)
        if perms_needed:
            self.message_user(
                request,
                _(
                    "Deleted nothing: %(doing)s would also delete %(models)s, which your "
                    "account has no permission to delete."
                )
                % {
                    "doing": doing,
                    "models": ", ".join(sorted(str(name) for name in perms_needed)),
                },
                messages.ERROR,
            )
            return True
        if protected:
            self.message_user(
                request,
                _(
                    "Deleted nothing: %(doing)s would require deleting %(n)d protected related "
                    "object(s)."
                )
                % {"doing": doing, "n": len(protected)},
                messages.ERROR,
            )
            return True
        return False

    @admin.action(description=_("Delete selected finished operations"), permissions=["delete"])
    def delete_finished_selected(
        self, request: HttpRequest, queryset: QuerySet[BatchOperation]
    ) -> HttpResponse | None:
        finished = queryset.filter(status=BatchOperation.STATUS_FINISHED)
        if self._refused_cascade(request, finished, _("deleting the selected finished operations")):
            return None
        rows = list(finished)  # for the history: a finished operation stays so
        _deleted, by_model = finished.delete()
        admin.ModelAdmin.log_deletions(self, request, cast(Any, rows))
        # delete() counts the cascaded rows too; report the operations alone.
        deleted = by_model.get(BatchOperation._meta.label, 0)
        self.message_user(
            request, _("Deleted %(n)d finished operation(s).") % {"n": deleted}, messages.INFO
        )
        return None

    @admin.action(
        description=_("Mark selected abandoned synchronous operations as failed"),
        permissions=["abandon"],
    )
    def fail_abandoned_selected(
        self, request: HttpRequest, queryset: BatchOperationQuerySet
    ) -> None:
        # Only running operations no worker claimed can be abandoned: a worker's are recovered
        # when their lease expires. Whether the process running one is gone is the user's call.
        # Counted before marking: the queryset carries the changelist's filter (say, running),
        # which the rows just marked no longer match.
        selected = queryset.count()
        marked = fail_abandoned(
            queryset,
            reason=_(
                "Marked abandoned in the admin by %(user)s: the process running it stopped "
                "without finishing it."
            )
            % {"user": request.user.get_username()},
        )
        skipped = selected - marked
        self.message_user(
            request,
            _(
                "Marked %(n)d operation(s) as failed; %(m)d were left as they are (only running "
                "operations that no worker claimed can be marked abandoned)."
            )
            % {"n": marked, "m": skipped},
            messages.INFO if not skipped else messages.WARNING,
        )
