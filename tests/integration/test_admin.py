"""The read-only admin for batch operations: changelist, change view, filters, search,
pretty JSON, permissions, the cancel, delete and abandon actions and the delete page."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.admin import helpers
from django.contrib.admin.models import DELETION, LogEntry
from django.contrib.admin.sites import site
from django.contrib.admin.utils import quote
from django.contrib.auth.models import Permission
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import path, reverse
from django.utils import timezone

from batchframework.admin import BatchOperationAdmin
from batchframework.engine import cancel, claim
from batchframework.models import BatchOperation
from batchframework.testing import run_due
from tests.integration.test_second_database import HAS_OTHER, OTHER
from tests.testapp.models import OperationLine, Post, StringThing

pytestmark = pytest.mark.django_db

CHANGELIST = "admin:batchframework_batchoperation_changelist"


def change_url(operation: BatchOperation) -> str:
    return reverse("admin:batchframework_batchoperation_change", args=[operation.pk])


def listed_pks(response) -> set:
    return {operation.pk for operation in response.context["cl"].result_list}


@pytest.fixture
def superuser(django_user_model):
    return django_user_model.objects.create_superuser("admin", "admin@example.com", "pw")


@pytest.fixture
def admin_client(client, superuser):
    client.force_login(superuser)
    return client


@pytest.fixture
def operator_client(client, django_user_model):
    """A staff user who may view and delete batch operations, and nothing else."""
    operator = django_user_model.objects.create_user("operator", password="pw", is_staff=True)
    operator.user_permissions.add(
        *Permission.objects.filter(
            content_type__app_label="batchframework",
            codename__in=["view_batchoperation", "delete_batchoperation"],
        )
    )
    client.force_login(operator)
    return client


@pytest.fixture
def viewer_client(client, django_user_model):
    """A staff user who may view batch operations, and nothing else."""
    viewer = django_user_model.objects.create_user("viewer", password="pw", is_staff=True)
    viewer.user_permissions.add(
        Permission.objects.get(
            content_type__app_label="batchframework", codename="view_batchoperation"
        )
    )
    client.force_login(viewer)
    return client


@pytest.fixture
def operations(superuser):
    """One operation per state, the finished ones with data, about a user (whose admin page
    exists, so the context object is a link) or a post (no admin page)."""
    pending = BatchOperation.objects.create_asynchronous(
        operationtype="new-blogpost-email",
        context_object=Post.objects.create(title="p"),
        input_data={"recipients": ["a@example.com"], "subject": "Hello"},
    )
    running = BatchOperation.objects.create_synchronous(
        operationtype="deal-cards",
        context_object=superuser,
        started_by=superuser,
    )
    successful = BatchOperation.objects.create_synchronous(operationtype="deal-cards")
    successful.finish(output_data={"dealt": 52, "players": ["ann", "bob"]})
    failed = BatchOperation.objects.create_synchronous(operationtype="import-users")
    failed.finish(failed=True, output_data={"error": {"type": "ValueError", "message": "bad"}})
    return {"pending": pending, "running": running, "successful": successful, "failed": failed}


# --- Changelist. ------------------------------------------------------------------------------


def test_changelist_lists_every_operation_with_its_columns(admin_client, operations, superuser):
    response = admin_client.get(reverse(CHANGELIST))
    assert response.status_code == 200
    assert listed_pks(response) == {op.pk for op in operations.values()}
    html = response.content.decode()
    for column in (
        "operationtype",
        "status",
        "result",
        "context_link",
        "started_by",
        "created_datetime",
        "run_after",
        "started_running_datetime",
        "finished_datetime",
    ):
        assert f"column-{column}" in html, column
    assert "new-blogpost-email" in html and "import-users" in html
    user_url = reverse("admin:auth_user_change", args=[superuser.pk])
    assert f'<a href="{user_url}">auth.user #{superuser.pk}</a>' in html
    post = operations["pending"].context_object
    # Post has no admin page: shown as text, not a link.
    assert f"testapp.post #{post.pk}" in html


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("status__exact=unprocessed", {"pending"}),
        ("status__exact=running", {"running"}),
        ("status__exact=finished", {"successful", "failed"}),
        ("result__exact=failed", {"failed"}),
        ("operationtype__exact=deal-cards", {"running", "successful"}),
        ("status__exact=finished&result__exact=successful", {"successful"}),
    ],
)
def test_changelist_filters(admin_client, operations, query, expected):
    response = admin_client.get(f"{reverse(CHANGELIST)}?{query}")
    assert response.status_code == 200
    assert listed_pks(response) == {operations[name].pk for name in expected}


@pytest.mark.parametrize(
    ("term", "expected"),
    [
        ("blogpost", {"pending"}),
        ("deal", {"running", "successful"}),
        ("admin", {"running"}),  # started_by__username
        ("no-such-thing", set()),
    ],
)
def test_changelist_search(admin_client, operations, term, expected):
    response = admin_client.get(reverse(CHANGELIST), {"q": term})
    assert response.status_code == 200
    assert listed_pks(response) == {operations[name].pk for name in expected}


def test_changelist_searches_the_user_models_own_name_field(
    admin_client, operations, django_user_model, monkeypatch
):
    """A custom user model may name users by another field than ``username``."""
    monkeypatch.setattr(django_user_model, "USERNAME_FIELD", "email")
    response = admin_client.get(reverse(CHANGELIST), {"q": "admin@example"})
    assert response.status_code == 200
    assert listed_pks(response) == {operations["running"].pk}


def test_changelist_search_by_id(admin_client, operations):
    wanted = operations["failed"]
    response = admin_client.get(reverse(CHANGELIST), {"q": str(wanted.pk)})
    assert response.status_code == 200
    assert wanted.pk in listed_pks(response)
    # No column of this one holds the searched number.
    assert operations["successful"].pk not in listed_pks(response)


def test_changelist_filters_by_creation_date(admin_client, operations):
    old = BatchOperation.objects.create_asynchronous(
        operationtype="old", created_datetime=timezone.now() - timedelta(days=30)
    )
    since = (timezone.now() - timedelta(days=7)).isoformat()
    response = admin_client.get(reverse(CHANGELIST), {"created_datetime__gte": since})
    assert response.status_code == 200
    assert listed_pks(response) == {op.pk for op in operations.values()}
    response = admin_client.get(reverse(CHANGELIST), {"created_datetime__lt": since})
    assert listed_pks(response) == {old.pk}


# --- Change view. -----------------------------------------------------------------------------


def test_change_view_shows_the_operation_read_only(admin_client, operations, superuser):
    operation = operations["running"]
    response = admin_client.get(change_url(operation))
    assert response.status_code == 200
    html = response.content.decode()
    assert "deal-cards" in html
    assert "running" in html
    user_url = reverse("admin:auth_user_change", args=[superuser.pk])
    assert f'<a href="{user_url}">auth.user #{superuser.pk}</a>' in html
    for label in ("Started running", "Finished", "Created", "Run after"):
        assert label in html
    # Read-only: no form fields for the data and no save buttons.
    for field in ("status", "result", "input_data", "output_data", "operationtype"):
        assert f'name="{field}"' not in html
    assert 'name="_save"' not in html


def test_change_view_shows_json_pretty_printed(admin_client, operations):
    response = admin_client.get(change_url(operations["pending"]))
    html = response.content.decode()
    assert (
        "<pre>{\n"
        "  &quot;recipients&quot;: [\n"
        "    &quot;a@example.com&quot;\n"
        "  ],\n"
        "  &quot;subject&quot;: &quot;Hello&quot;\n"
        "}</pre>"
    ) in html

    response = admin_client.get(change_url(operations["successful"]))
    html = response.content.decode()
    assert "<pre>{\n  &quot;dealt&quot;: 52,\n  &quot;players&quot;: [\n" in html


def test_change_view_escapes_json_content(admin_client):
    operation = BatchOperation.objects.create_asynchronous(
        input_data={"html": "<script>alert(1)</script>"}
    )
    html = admin_client.get(change_url(operation)).content.decode()
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_change_view_refuses_changes(admin_client, operations):
    operation = operations["pending"]
    response = admin_client.post(change_url(operation), {"status": "finished"})
    assert response.status_code == 403
    assert BatchOperation.objects.get(pk=operation.pk).status == "unprocessed"


# --- Permissions. -----------------------------------------------------------------------------


def test_add_view_is_forbidden(admin_client):
    response = admin_client.get(reverse("admin:batchframework_batchoperation_add"))
    assert response.status_code == 403
    changelist = admin_client.get(reverse(CHANGELIST)).content.decode()
    assert reverse("admin:batchframework_batchoperation_add") not in changelist


def test_staff_user_without_permissions_gets_403(client, django_user_model, operations):
    staff = django_user_model.objects.create_user("staff", password="pw", is_staff=True)
    client.force_login(staff)
    assert client.get(reverse(CHANGELIST)).status_code == 403
    assert client.get(change_url(operations["pending"])).status_code == 403


def test_staff_user_with_view_permission_sees_but_cannot_cancel(viewer_client, operations):
    client = viewer_client
    response = client.get(reverse(CHANGELIST))
    assert response.status_code == 200
    assert "cancel_selected" not in response.content.decode()
    assert "delete_finished_selected" not in response.content.decode()
    assert client.get(change_url(operations["pending"])).status_code == 200


# --- The cancel action. -----------------------------------------------------------------------


def test_cancel_selected_cancels_pending_and_reports_too_late(admin_client, operations):
    second_pending = BatchOperation.objects.create_asynchronous(operationtype="later")
    selected = [
        operations["pending"],
        second_pending,
        operations["running"],
        operations["successful"],
    ]
    response = admin_client.post(
        reverse(CHANGELIST),
        {"action": "cancel_selected", helpers.ACTION_CHECKBOX_NAME: [op.pk for op in selected]},
        follow=True,
    )
    assert response.status_code == 200
    messages = [str(message) for message in response.context["messages"]]
    assert messages == [
        "Cancelled 2 operation(s); 2 were running or finished (too late to cancel)."
    ]
    # In the history, as the delete page logs a cancel.
    logged = LogEntry.objects.filter(action_flag=DELETION).values_list("object_id", flat=True)
    assert sorted(logged) == sorted(str(op.pk) for op in selected[:2])

    assert not BatchOperation.objects.filter(
        pk__in=[operations["pending"].pk, second_pending.pk]
    ).exists()
    assert BatchOperation.objects.get(pk=operations["running"].pk).status == "running"
    assert BatchOperation.objects.get(pk=operations["successful"].pk).result == "successful"
    assert BatchOperation.objects.get(pk=operations["failed"].pk).result == "failed"


def test_cancel_selected_costs_the_same_statements_for_few_and_many(admin_client):
    """One transaction per operation made cancelling a large selection take minutes."""

    def statements(count: int) -> int:
        pending = BatchOperation.objects.bulk_create(
            [BatchOperation(operationtype="later") for _ in range(count)]
        )
        if pending[0].pk is None:  # MariaDB and older SQLite return no keys
            pending = list(BatchOperation.objects.unprocessed())
        with CaptureQueriesContext(connection) as queries:
            admin_client.post(
                reverse(CHANGELIST),
                {
                    "action": "cancel_selected",
                    helpers.ACTION_CHECKBOX_NAME: [op.pk for op in pending],
                },
            )
        assert not BatchOperation.objects.exists()
        return len(queries)

    assert statements(3) == statements(30)


def test_the_change_page_shows_data_and_a_synchronous_failure_readably(admin_client):
    """Non-ASCII text was shown as ``\\u`` escapes, and a failed synchronous operation's
    traceback (kept in output_data only) as one line of JSON with literal ``\\n``."""
    block = BatchOperation.objects.synchronous(input_data={"navn": "Øyvind Ærø"})
    with pytest.raises(ValueError), block as operation:
        raise ValueError("Ødelagt fil: 東京.csv")
    page = admin_client.get(change_url(operation)).content.decode()
    assert "Øyvind Ærø" in page and "Ødelagt fil: 東京.csv" in page
    assert "Traceback (most recent call last):\n" in page  # a real line break, in a <pre>


def test_cancel_selected_is_offered_to_superusers(admin_client, operations):
    html = admin_client.get(reverse(CHANGELIST)).content.decode()
    assert 'value="cancel_selected"' in html


# --- Deleting. --------------------------------------------------------------------------------


def delete_url(operation: BatchOperation) -> str:
    return reverse("admin:batchframework_batchoperation_delete", args=[operation.pk])


def test_delete_finished_selected_deletes_only_finished_operations(admin_client, operations):
    response = admin_client.post(
        reverse(CHANGELIST),
        {
            "action": "delete_finished_selected",
            helpers.ACTION_CHECKBOX_NAME: [op.pk for op in operations.values()],
        },
        follow=True,
    )
    assert response.status_code == 200
    messages = [str(message) for message in response.context["messages"]]
    assert messages == ["Deleted 2 finished operation(s)."]
    remaining = set(BatchOperation.objects.values_list("pk", flat=True))
    assert remaining == {operations["pending"].pk, operations["running"].pk}


def test_the_delete_page_cancels_a_pending_operation_and_deletes_a_finished_one(
    admin_client, operations
):
    for name in ("pending", "successful", "failed"):
        response = admin_client.post(delete_url(operations[name]), {"post": "yes"})
        assert response.status_code == 302, name
        assert not BatchOperation.objects.filter(pk=operations[name].pk).exists(), name


def test_the_delete_page_of_a_running_operation_says_why_it_deletes_nothing(
    admin_client, operations
):
    """A stale link (the operation was pending when the page loaded): a message on the
    operation's page rather than a bare 403, and nothing deleted or logged."""
    running = operations["running"]
    for response in (
        admin_client.get(delete_url(running), follow=True),
        admin_client.post(delete_url(running), {"post": "yes"}, follow=True),
    ):
        assert response.redirect_chain == [(change_url(running), 302)]
        assert [str(message) for message in response.context["messages"]] == [
            f"Operation #{running.pk} is running, so it can't be deleted: a running operation "
            "can't be cancelled."
        ]
    assert BatchOperation.objects.get(pk=running.pk).status == "running"
    assert not LogEntry.objects.filter(action_flag=DELETION).exists()
    assert (
        f'href="{delete_url(running)}"'
        not in admin_client.get(change_url(running)).content.decode()
    )


def test_the_delete_page_of_a_running_operation_is_forbidden_without_delete_permission(
    viewer_client, operations
):
    running = operations["running"]
    assert viewer_client.get(delete_url(running)).status_code == 403
    assert viewer_client.post(delete_url(running), {"post": "yes"}).status_code == 403
    assert BatchOperation.objects.get(pk=running.pk).status == "running"


#: What happened between the delete page's load and its POST, what was left of the operation,
#: where the view went back to and what it said.
CHANGED_MEANWHILE = [
    pytest.param(
        claim,
        "running",
        "change",
        "Operation #{pk} started running before it could be cancelled, so it was not "
        "deleted: a running operation can't be cancelled.",
        id="claimed",
    ),
    pytest.param(
        lambda pk: run_due(),
        "finished",
        "change",
        "Operation #{pk} ran and finished before it could be cancelled, so it was not deleted.",
        id="finished",
    ),
    pytest.param(
        cancel,
        None,
        "changelist",
        "Operation #{pk} was already cancelled or deleted.",
        id="cancelled",
    ),
]


def delete_after_change_meanwhile(client, monkeypatch, meanwhile, status, page, message):
    """The delete view read the operation while it was pending; before the view cancelled it, a
    worker claimed it (or ran it, or someone cancelled it): the engine refuses, and the admin
    says why, logs no deletion and goes back to the operation's page (or the list)."""
    pending = BatchOperation.objects.create_asynchronous(operationtype="test-noop")
    assert client.get(delete_url(pending)).status_code == 200
    as_read = BatchOperation.objects.get(pk=pending.pk)
    meanwhile(pending.pk)
    # The view gets the row as it read it, still pending, just before the change.
    monkeypatch.setattr(BatchOperationAdmin, "get_object", lambda *args, **kwargs: as_read)

    response = client.post(delete_url(pending), {"post": "yes"}, follow=True)

    expected_url = change_url(pending) if page == "change" else reverse(CHANGELIST)
    assert response.redirect_chain == [(expected_url, 302)]
    assert [str(m) for m in response.context["messages"]] == [message.format(pk=pending.pk)]
    left = BatchOperation.objects.filter(pk=pending.pk).values_list("status", flat=True)
    assert left.first() == status
    assert not LogEntry.objects.filter(action_flag=DELETION).exists()


@pytest.mark.parametrize(("meanwhile", "status", "page", "message"), CHANGED_MEANWHILE)
def test_the_delete_page_says_why_it_did_not_delete_an_operation_that_changed_meanwhile(
    operator_client, monkeypatch, meanwhile, status, page, message
):
    delete_after_change_meanwhile(operator_client, monkeypatch, meanwhile, status, page, message)


def test_the_delete_page_still_refuses_if_it_could_not_lock_the_operation(
    operator_client, monkeypatch
):
    """Without a row lock (SQLite has none) a worker may claim the operation after the check;
    the engine then refuses in delete_model, whose error rolls back the view's transaction."""
    monkeypatch.setattr(BatchOperationAdmin, "_hold_pending", lambda self, operation: None)
    [claimed] = [case for case in CHANGED_MEANWHILE if case.id == "claimed"]
    delete_after_change_meanwhile(operator_client, monkeypatch, *claimed.values)


@pytest.fixture
def batch_tables_elsewhere(settings):
    """A router that keeps batchframework's tables on another database than the admin's
    LogEntry (and the users): the delete view's transaction is then not LogEntry's."""
    settings.DATABASE_ROUTERS = ["tests.integration.test_second_database.BatchTablesElsewhere"]


@pytest.mark.skipif(not HAS_OTHER, reason="a second PostgreSQL test database is needed")
@pytest.mark.django_db(databases=["default", OTHER])
@pytest.mark.parametrize(("meanwhile", "status", "page", "message"), CHANGED_MEANWHILE)
def test_a_refused_delete_logs_no_deletion_when_batch_tables_are_on_another_database(
    operator_client, batch_tables_elsewhere, monkeypatch, meanwhile, status, page, message
):
    """Django logs a deletion before it deletes, on LogEntry's database, outside the delete
    view's transaction (opened on the operations' database): rolling that back when the
    engine refuses left a "Deleted" entry for an operation that was not deleted."""
    delete_after_change_meanwhile(operator_client, monkeypatch, meanwhile, status, page, message)
    assert not BatchOperation.objects.using("default").exists()  # the router was in effect


def assert_the_delete_page_cancels_and_logs(client):
    pending = BatchOperation.objects.create_asynchronous(operationtype="test-noop")
    response = client.post(delete_url(pending), {"post": "yes"}, follow=True)
    [message] = response.context["messages"]
    assert "was deleted successfully" in str(message)
    assert not BatchOperation.objects.filter(pk=pending.pk).exists()
    assert LogEntry.objects.get(action_flag=DELETION).object_id == str(pending.pk)


def test_the_delete_page_logs_the_deletion_of_a_cancelled_operation(operator_client):
    assert_the_delete_page_cancels_and_logs(operator_client)


@pytest.mark.skipif(not HAS_OTHER, reason="a second PostgreSQL test database is needed")
@pytest.mark.django_db(databases=["default", OTHER])
def test_the_delete_page_cancels_and_logs_when_batch_tables_are_on_another_database(
    operator_client, batch_tables_elsewhere
):
    assert_the_delete_page_cancels_and_logs(operator_client)


# --- Deleting finished operations and the rows that cascade from them. ------------------------


@pytest.fixture
def finished_with_lines():
    """A finished operation with ten rows that cascade from it."""
    operation = BatchOperation.objects.create_synchronous(operationtype="import-lines")
    OperationLine.objects.bulk_create(OperationLine(batchoperation=operation) for _ in range(10))
    operation.finish()
    return operation


def _in_admin(settings, model):
    """Give ``model`` an admin for one test. The URLs are built anew, as the admin's pages
    link to every registered model's."""
    site.register(model)

    class urls:
        urlpatterns = [path("admin/", site.urls)]

    settings.ROOT_URLCONF = urls
    yield
    site.unregister(model)


@pytest.fixture
def lines_in_admin(settings):
    """Give ``OperationLine`` an admin: Django asks for the delete permission only on models
    that have one (it takes the others for inlines of their parent)."""
    yield from _in_admin(settings, OperationLine)


@pytest.fixture
def text_keys_in_admin(settings):
    """Give ``StringThing`` (a text primary key) an admin, for the context object's link."""
    yield from _in_admin(settings, StringThing)


def test_the_context_link_quotes_a_text_key_as_the_admin_does(admin_client, text_keys_in_admin):
    """The key went into the URL as it is: the admin unquotes ``_5F`` and the like, so a key
    holding them (or a "/") linked to another object's page, or to none."""
    thing = StringThing.objects.create(slug="a_5Fb/c")
    operation = BatchOperation.objects.create_asynchronous(context_object=thing)
    page = admin_client.get(change_url(operation)).content.decode()
    link = reverse("admin:testapp_stringthing_change", args=[quote(thing.pk)])
    assert f'href="{link}"' in page
    assert admin_client.get(link).context["original"] == thing


def delete_finished(client, operation: BatchOperation):
    return client.post(
        reverse(CHANGELIST),
        {"action": "delete_finished_selected", helpers.ACTION_CHECKBOX_NAME: [operation.pk]},
        follow=True,
    )


def test_delete_finished_selected_counts_operations_not_cascaded_rows(
    admin_client, finished_with_lines, lines_in_admin
):
    response = delete_finished(admin_client, finished_with_lines)
    assert response.status_code == 200
    messages = [str(message) for message in response.context["messages"]]
    assert messages == ["Deleted 1 finished operation(s)."]
    assert not BatchOperation.objects.exists()
    assert not OperationLine.objects.exists()


def test_delete_finished_selected_needs_permission_to_delete_the_cascaded_rows(
    operator_client, finished_with_lines, lines_in_admin
):
    response = delete_finished(operator_client, finished_with_lines)
    assert response.status_code == 200
    messages = [str(message) for message in response.context["messages"]]
    assert messages == [
        "Deleted nothing: deleting the selected finished operations would also delete "
        "operation line, which your account has no permission to delete."
    ]
    assert BatchOperation.objects.filter(pk=finished_with_lines.pk).exists()
    assert OperationLine.objects.count() == 10


def test_delete_finished_selected_refuses_to_delete_protected_rows(
    admin_client, finished_with_lines, monkeypatch
):
    """What Django's ``get_deleted_objects`` hook reports protected (rows with a ``PROTECT`` or
    ``RESTRICT`` key to the operation) stops the whole deletion."""
    monkeypatch.setattr(
        BatchOperationAdmin,
        "get_deleted_objects",
        lambda self, objs, request: ([], {}, set(), ["Invoice: #1"]),
    )
    response = delete_finished(admin_client, finished_with_lines)
    messages = [str(message) for message in response.context["messages"]]
    assert messages == [
        "Deleted nothing: deleting the selected finished operations would require deleting "
        "1 protected related object(s)."
    ]
    assert BatchOperation.objects.filter(pk=finished_with_lines.pk).exists()
    assert OperationLine.objects.count() == 10


def test_cancel_selected_needs_permission_to_delete_the_cascaded_rows(
    operator_client, lines_in_admin
):
    """A cancel deletes the operation, and the rows that cascade from it: like the delete
    action, it must not delete rows of a model the user may not delete."""
    pending = BatchOperation.objects.create_asynchronous(operationtype="import-lines")
    OperationLine.objects.bulk_create(OperationLine(batchoperation=pending) for _ in range(3))
    response = operator_client.post(
        reverse(CHANGELIST),
        {"action": "cancel_selected", helpers.ACTION_CHECKBOX_NAME: [pending.pk]},
        follow=True,
    )
    messages = [str(message) for message in response.context["messages"]]
    assert messages == [
        "Deleted nothing: cancelling the selected operations would also delete operation line, "
        "which your account has no permission to delete."
    ]
    assert BatchOperation.objects.filter(pk=pending.pk).exists()
    assert OperationLine.objects.count() == 3


# --- Marking abandoned synchronous operations failed. -----------------------------------------


def fail_abandoned_selected(client, operations: list[BatchOperation]):
    return client.post(
        reverse(CHANGELIST),
        {
            "action": "fail_abandoned_selected",
            helpers.ACTION_CHECKBOX_NAME: [op.pk for op in operations],
        },
        follow=True,
    )


def test_fail_abandoned_selected_marks_only_running_operations_no_worker_claimed(
    admin_client, operations
):
    claimed = claim(BatchOperation.objects.create_asynchronous(operationtype="test-noop").pk)
    assert claimed is not None
    response = fail_abandoned_selected(admin_client, [*operations.values(), claimed])
    assert response.status_code == 200
    messages = [str(message) for message in response.context["messages"]]
    assert messages == [
        "Marked 1 operation(s) as failed; 4 were left as they are (only running operations "
        "that no worker claimed can be marked abandoned)."
    ]
    running = BatchOperation.objects.get(pk=operations["running"].pk)
    assert (running.status, running.result) == ("finished", "failed")
    assert running.error is not None
    assert running.error["message"] == (
        "Marked abandoned in the admin by admin: the process running it stopped without "
        "finishing it."
    )
    statuses = dict(BatchOperation.objects.values_list("pk", "status"))
    assert statuses[claimed.pk] == "running"
    assert statuses[operations["pending"].pk] == "unprocessed"
    successful = BatchOperation.objects.get(pk=operations["successful"].pk)
    assert successful.output_data == {"dealt": 52, "players": ["ann", "bob"]}


def test_fail_abandoned_selected_needs_the_change_permission(operator_client, operations):
    """The operator may view and delete, not change: the action is not offered, and a forged
    POST of it changes nothing."""
    changelist = operator_client.get(reverse(CHANGELIST)).content.decode()
    assert "delete_finished_selected" in changelist
    assert "fail_abandoned_selected" not in changelist
    fail_abandoned_selected(operator_client, [operations["running"]])
    assert BatchOperation.objects.get(pk=operations["running"].pk).status == "running"


def test_fail_abandoned_selected_is_offered_with_the_change_permission(
    client, django_user_model, operations
):
    user = django_user_model.objects.create_user("changer", password="pw", is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(
            content_type__app_label="batchframework",
            codename__in=["view_batchoperation", "change_batchoperation"],
        )
    )
    client.force_login(user)
    assert "fail_abandoned_selected" in client.get(reverse(CHANGELIST)).content.decode()
    fail_abandoned_selected(client, [operations["running"]])
    assert BatchOperation.objects.get(pk=operations["running"].pk).result == "failed"


def test_fail_abandoned_selected_counts_the_selection_of_a_filtered_changelist(admin_client):
    """The action's queryset carries the changelist's filter (here: running), which the rows
    it just finished no longer match: counted after marking, it reported -2 left as they are."""
    selected = [
        BatchOperation.objects.create_synchronous(operationtype="deal-cards") for _ in range(2)
    ]
    response = admin_client.post(
        f"{reverse(CHANGELIST)}?status__exact=running",
        {
            "action": "fail_abandoned_selected",
            helpers.ACTION_CHECKBOX_NAME: [op.pk for op in selected],
        },
        follow=True,
    )
    assert response.status_code == 200
    messages = [str(message) for message in response.context["messages"]]
    assert messages == [
        "Marked 2 operation(s) as failed; 0 were left as they are (only running operations "
        "that no worker claimed can be marked abandoned)."
    ]
    [message] = response.context["messages"]
    assert message.level_tag == "info"
    assert set(BatchOperation.objects.values_list("result", flat=True)) == {"failed"}
