"""Scenarios 12 and 13 in the admin: authorization and hostile ids → refused, 403/404 (or the
admin's "does not exist" redirect), nothing written, nothing lost.

- A staff user without the view permission gets 403 for the changelist and the change page.
- ``cancel_selected`` needs the model's delete permission; without it the action is not
  offered and a forged POST changes nothing.
- Ids of other (running, finished, non-existent) operations and malformed ids change nothing;
  a running operation is never deleted through the admin (invariant 3).

No subprocesses: runs on PostgreSQL, SQLite and MariaDB.
"""

from __future__ import annotations

import time

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client

from batchframework import BatchOperation, enqueue
from batchframework.engine import claim

pytestmark = [pytest.mark.reliability, pytest.mark.django_db, pytest.mark.timeout(60)]

CHANGELIST = "/admin/batchframework/batchoperation/"


@pytest.fixture(autouse=True)
def _postgresql_only():
    """Overrides the suite's PostgreSQL-only gate: no subprocesses here, every database."""


def _staff(username: str, *perms: str) -> Client:
    user = User.objects.create_user(username, password="pw", is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(content_type__app_label="batchframework", codename__in=perms)
    )
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def ops() -> dict[str, BatchOperation]:
    pending = enqueue("test-effect")
    running_op = enqueue("test-effect")
    running = claim(running_op.pk)
    assert running is not None
    finished = BatchOperation.objects.create_synchronous(operationtype="manual")
    finished.finish()
    return {"pending": pending, "running": running, "finished": finished}


def _snapshot() -> list[tuple]:
    return list(
        BatchOperation.objects.order_by("pk").values_list("pk", "status", "result", "attempts")
    )


def _action(client: Client, action: str, ids: list, **extra) -> object:
    return client.post(
        CHANGELIST,
        {"action": action, "_selected_action": [str(i) for i in ids], "index": "0", **extra},
    )


def test_staff_without_view_permission_gets_403(ops):
    client = _staff("noperm")
    before = _snapshot()
    assert client.get(CHANGELIST).status_code == 403
    assert client.get(f"{CHANGELIST}{ops['pending'].pk}/change/").status_code == 403
    assert _action(client, "cancel_selected", [ops["pending"].pk]).status_code == 403
    assert _snapshot() == before
    anonymous = Client().get(CHANGELIST)
    assert anonymous.status_code == 302 and "/login/" in anonymous["Location"]


def test_cancel_selected_needs_the_delete_permission(ops):
    viewer = _staff("viewer", "view_batchoperation")
    response = viewer.get(CHANGELIST)
    assert response.status_code == 200
    assert "cancel_selected" not in response.content.decode()
    before = _snapshot()
    _action(viewer, "cancel_selected", [ops["pending"].pk])
    _action(viewer, "delete_selected", [ops["pending"].pk], post="yes")
    assert _snapshot() == before, "an action ran without the delete permission"

    deleter = _staff("deleter", "view_batchoperation", "delete_batchoperation")
    assert "cancel_selected" in deleter.get(CHANGELIST).content.decode()
    _action(deleter, "cancel_selected", [o.pk for o in ops.values()])
    left = dict((pk, status) for pk, status, *_ in _snapshot())
    assert ops["pending"].pk not in left, "the pending operation was not cancelled"
    assert left == {ops["running"].pk: "running", ops["finished"].pk: "finished"}


def test_hostile_and_malformed_ids_change_nothing(ops, reliability_report):
    started = time.monotonic()
    admin = User.objects.create_superuser("root", password="pw")
    client = Client()
    client.force_login(admin)
    before = _snapshot()
    statuses = {}
    for bad in ("999999999", "abc", "-1", "1.5", "%00", "1%20OR%201=1", "0x10"):
        for view in ("change", "delete", "history"):
            statuses[(bad, view)] = client.get(f"{CHANGELIST}{bad}/{view}/").status_code
            post = client.post(f"{CHANGELIST}{bad}/{view}/", {"post": "yes"}).status_code
            assert post in (302, 403, 404), (bad, view, post)
    assert set(statuses.values()) <= {302, 404}, statuses
    for ids in (["999999999"], ["-1", "0"], [str(ops["running"].pk), str(ops["finished"].pk)]):
        response = _action(client, "cancel_selected", ids)
        assert response.status_code in (200, 302, 404), (ids, response.status_code)
    assert _snapshot() == before
    reliability_report(
        12,
        operations=len(before),
        runs=0,
        duplicates=0,
        lost=len(before) - len(_snapshot()),
        seconds=time.monotonic() - started,
        case="admin-hostile-ids",
        requests=len(statuses) * 2 + 4,
    )


def test_action_with_malformed_selected_ids_is_a_client_error_not_a_500(ops):
    """A forged POST of the changelist action with non-numeric ``_selected_action`` values
    must be refused (4xx, or the changelist with a message), not crash with a 500."""
    admin = User.objects.create_superuser("root", password="pw")
    client = Client(raise_request_exception=False)
    client.force_login(admin)
    before = _snapshot()
    codes = {
        ids[0]: _action(client, "cancel_selected", ids).status_code
        for ids in (["abc"], ["1 OR 1=1"], ["1.5"])
    }
    assert _snapshot() == before
    assert 500 not in codes.values(), f"server errors for malformed ids: {codes}"


def test_admin_never_deletes_a_running_operation(ops):
    """Invariant 3: cancelling a running operation is refused, never a silent race. The admin's
    delete page and the site-wide "delete selected" action must not remove a running row (its
    handler is still executing; deleting it would lose the record of the run)."""
    admin = User.objects.create_superuser("root", password="pw")
    client = Client()
    client.force_login(admin)
    running = ops["running"].pk
    client.post(f"{CHANGELIST}{running}/delete/", {"post": "yes"})
    still_after_delete_view = BatchOperation.objects.filter(pk=running).exists()
    _action(client, "delete_selected", [running], post="yes")
    still_after_action = BatchOperation.objects.filter(pk=running).exists()
    assert still_after_delete_view, "the admin delete page deleted a running operation"
    assert still_after_action, "the admin 'delete selected' action deleted a running operation"
