"""The ``BatchOperation`` model API: fields, constants, app config, context objects, the
intent-named filters, the seed's creation and manual-flow methods, validation, the database
check constraints, JSON data, and refusal of bad input before anything is written."""

from __future__ import annotations

import json
import math
import uuid
from datetime import UTC, datetime, timedelta
from unittest import mock

import pytest
from django.apps import AppConfig, apps
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AnonymousUser
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, models, transaction
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

import batchframework.apps
from batchframework.exceptions import InputDataError, InvalidOperationError
from batchframework.models import BatchOperation
from tests.testapp.models import Game, Post, StringThing, UUIDThing

pytestmark = pytest.mark.django_db

ORIGINAL_FIELDS = [
    "started_by",
    "created_datetime",
    "started_running_datetime",
    "finished_datetime",
    "context_content_type",
    "context_object_id",
    "operationtype",
    "status",
    "result",
    "input_data",
    "output_data",
]


def past(**kwargs: float) -> datetime:
    return timezone.now() - timedelta(**kwargs)


def future(**kwargs: float) -> datetime:
    return timezone.now() + timedelta(**kwargs)


def pks(queryset: models.QuerySet) -> set:
    return set(queryset.values_list("pk", flat=True))


def warm_content_types(*model_classes: type[models.Model]) -> None:
    """Fill ContentType's cache so query counts measure only the code under test."""
    for model_class in model_classes:
        ContentType.objects.get_for_model(model_class)


# --- Fields, constants and choices. ----------------------------------------------------------


def test_the_original_fields_exist_with_their_kinds():
    meta = BatchOperation._meta
    for name in ORIGINAL_FIELDS:
        meta.get_field(name)
    assert meta.get_field("started_by").related_model is get_user_model()
    assert meta.get_field("context_content_type").related_model is ContentType
    assert isinstance(meta.get_field("context_object_id"), models.CharField)
    assert isinstance(meta.get_field("input_data"), models.JSONField)
    assert isinstance(meta.get_field("output_data"), models.JSONField)
    for name in ("started_running_datetime", "finished_datetime"):
        assert meta.get_field(name).null


def test_status_and_result_constants_and_choices():
    assert BatchOperation.STATUS_UNPROCESSED == "unprocessed"
    assert BatchOperation.STATUS_RUNNING == "running"
    assert BatchOperation.STATUS_FINISHED == "finished"
    assert BatchOperation.RESULT_NOT_AVAILABLE == "not-available"
    assert BatchOperation.RESULT_SUCCESSFUL == "successful"
    assert BatchOperation.RESULT_FAILED == "failed"
    assert [key for key, _label in BatchOperation.STATUS_CHOICES] == [
        "unprocessed",
        "running",
        "finished",
    ]
    assert [key for key, _label in BatchOperation.RESULT_CHOICES] == [
        "not-available",
        "successful",
        "failed",
    ]
    status_field = BatchOperation._meta.get_field("status")
    result_field = BatchOperation._meta.get_field("result")
    assert [key for key, _ in status_field.choices] == [k for k, _ in BatchOperation.STATUS_CHOICES]
    assert [key for key, _ in result_field.choices] == [k for k, _ in BatchOperation.RESULT_CHOICES]
    assert status_field.default == BatchOperation.STATUS_UNPROCESSED
    assert result_field.default == BatchOperation.RESULT_NOT_AVAILABLE


def test_a_new_asynchronous_operation_has_the_original_defaults():
    before = timezone.now()
    operation = BatchOperation.objects.create_asynchronous()
    operation.refresh_from_db()
    assert operation.status == BatchOperation.STATUS_UNPROCESSED
    assert operation.result == BatchOperation.RESULT_NOT_AVAILABLE
    assert operation.operationtype == ""
    assert before <= operation.created_datetime <= timezone.now()
    assert operation.started_running_datetime is None
    assert operation.finished_datetime is None
    assert operation.started_by is None
    assert operation.context_object is None
    assert operation.input_data is None and operation.output_data is None


def test_status_display_uses_the_choices():
    operation = BatchOperation.objects.create_synchronous()
    assert operation.get_status_display() == "running"
    operation.finish(failed=True)
    assert operation.get_result_display() == "failed"


# --- App configuration. -----------------------------------------------------------------------


def test_the_installed_app_uses_batch_operation_app_config():
    config = apps.get_app_config("batchframework")
    assert type(config) is batchframework.apps.BatchOperationAppConfig
    assert config.name == "batchframework"


@pytest.mark.parametrize("entry", ["batchframework", "batchframework.apps.BatchOperationAppConfig"])
def test_both_installed_apps_spellings_resolve_to_the_same_config(entry):
    # AppConfig.create is how Django turns an INSTALLED_APPS entry into a config.
    config = AppConfig.create(entry)
    assert type(config) is batchframework.apps.BatchOperationAppConfig
    assert config.label == "batchframework"


def test_batch_operation_app_config_is_the_default_config():
    assert batchframework.apps.BatchOperationAppConfig.default is True
    configs = [
        value
        for value in vars(batchframework.apps).values()
        if isinstance(value, type) and issubclass(value, AppConfig) and value is not AppConfig
    ]
    assert [c for c in configs if getattr(c, "default", False)] == [
        batchframework.apps.BatchOperationAppConfig
    ]


@pytest.mark.parametrize("entry", ["batchframework", "batchframework.apps.BatchOperationAppConfig"])
def test_installed_apps_accepts_both_spellings(settings, entry):
    installed = [entry if app == "batchframework" else app for app in settings.INSTALLED_APPS]
    with override_settings(INSTALLED_APPS=installed):
        config = apps.get_app_config("batchframework")
        assert type(config) is batchframework.apps.BatchOperationAppConfig
        assert apps.get_model("batchframework", "BatchOperation") is BatchOperation


# --- Context objects. -------------------------------------------------------------------------


@pytest.fixture(params=["int", "uuid", "string"])
def context_object(request):
    if request.param == "int":
        return Post.objects.create(title="hello")
    if request.param == "uuid":
        return UUIDThing.objects.create()
    return StringThing.objects.create(slug="my-slug")


def test_context_object_round_trips_for_every_primary_key_kind(context_object):
    operation = BatchOperation.objects.create_asynchronous(
        context_object=context_object, operationtype="x"
    )
    loaded = BatchOperation.objects.get(pk=operation.pk)
    assert loaded.context_object == context_object
    assert loaded.context_content_type == ContentType.objects.get_for_model(context_object)
    assert loaded.context_object_id == str(context_object.pk)


def test_for_context_object_finds_only_that_objects_operations(context_object):
    mine = [
        BatchOperation.objects.create_asynchronous(context_object=context_object),
        BatchOperation.objects.create_synchronous(context_object=context_object),
    ]
    other = Post.objects.create(title="other")
    BatchOperation.objects.create_asynchronous(context_object=other)
    BatchOperation.objects.create_asynchronous()
    assert pks(BatchOperation.objects.for_context_object(context_object)) == {op.pk for op in mine}


def test_for_context_object_tells_apart_objects_of_other_types_with_the_same_id():
    post = Post.objects.create(title="p")
    game = Game.objects.create(pk=post.pk)
    same_text = StringThing.objects.create(slug=str(post.pk))
    by_object = {
        obj: BatchOperation.objects.create_asynchronous(context_object=obj)
        for obj in (post, game, same_text)
    }
    for obj, operation in by_object.items():
        assert pks(BatchOperation.objects.for_context_object(obj)) == {operation.pk}


def test_for_context_object_combines_with_other_filters():
    post = Post.objects.create(title="p")
    pending = BatchOperation.objects.create_asynchronous(context_object=post)
    BatchOperation.objects.create_synchronous(context_object=post)
    assert pks(BatchOperation.objects.for_context_object(post).unprocessed()) == {pending.pk}
    assert pks(BatchOperation.objects.unprocessed().for_context_object(post)) == {pending.pk}


def test_for_context_object_uses_the_context_index():
    post = Post.objects.create(title="p")
    BatchOperation.objects.create_asynchronous(context_object=post)
    warm_content_types(Post)
    queryset = BatchOperation.objects.for_context_object(post)
    with CaptureQueriesContext(connection) as queries:
        assert len(queryset) == 1
    assert len(queries.captured_queries) == 1
    sql = queries.captured_queries[0]["sql"]
    assert "context_content_type_id" in sql and "context_object_id" in sql
    with transaction.atomic():
        if connection.vendor == "postgresql":
            # A tiny table is cheapest to scan; forbid that so the planner shows its index.
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL enable_seqscan = off")
        plan = queryset.explain()
    assert "batchop_context_idx" in plan


# --- Intent-named filters. --------------------------------------------------------------------


@pytest.fixture
def one_of_each():
    return {
        "unprocessed": BatchOperation.objects.create_asynchronous(),
        "running": BatchOperation.objects.create_synchronous(),
        "successful": _finished(failed=False),
        "failed": _finished(failed=True),
    }


def _finished(failed: bool) -> BatchOperation:
    operation = BatchOperation.objects.create_synchronous()
    operation.finish(failed=failed)
    return operation


def test_status_filters(one_of_each):
    objects = BatchOperation.objects
    assert pks(objects.unprocessed()) == {one_of_each["unprocessed"].pk}
    assert pks(objects.running()) == {one_of_each["running"].pk}
    assert pks(objects.finished()) == {one_of_each["successful"].pk, one_of_each["failed"].pk}
    assert pks(objects.successful()) == {one_of_each["successful"].pk}
    assert pks(objects.failed()) == {one_of_each["failed"].pk}
    assert pks(objects.filter(pk=one_of_each["failed"].pk).successful()) == set()


def test_due_is_unprocessed_and_run_after_reached():
    due = BatchOperation.objects.create_asynchronous(run_after=past(minutes=1))
    BatchOperation.objects.create_asynchronous(run_after=future(hours=1))
    # Running and finished operations are never due, however old their run_after.
    BatchOperation.objects.create_synchronous(run_after=past(hours=1))
    _finished(failed=False)
    assert pks(BatchOperation.objects.due()) == {due.pk}


def test_due_with_an_explicit_now():
    soon = BatchOperation.objects.create_asynchronous(run_after=future(hours=1))
    later = BatchOperation.objects.create_asynchronous(run_after=future(hours=3))
    assert pks(BatchOperation.objects.due(now=future(hours=2))) == {soon.pk}
    assert pks(BatchOperation.objects.due(now=future(hours=4))) == {soon.pk, later.pk}
    assert pks(BatchOperation.objects.due(now=past(hours=1))) == set()
    # Exactly at run_after counts as due: "due" means run_after <= now.
    assert pks(BatchOperation.objects.due(now=soon.run_after)) == {soon.pk}


def test_due_without_now_uses_the_database_clock_not_pythons():
    overdue = BatchOperation.objects.create_asynchronous(run_after=past(minutes=5))
    BatchOperation.objects.create_asynchronous(run_after=future(hours=1))
    with mock.patch("django.utils.timezone.now", return_value=past(days=1)):
        assert pks(BatchOperation.objects.due()) == {overdue.pk}
    with mock.patch("django.utils.timezone.now", return_value=future(days=1)):
        assert pks(BatchOperation.objects.due()) == {overdue.pk}


# --- Creation. --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["create_asynchronous", "create_asyncronous"])
def test_create_asynchronous_and_its_seed_spelling(method, django_user_model):
    user = django_user_model.objects.create_user("alice")
    post = Post.objects.create(title="p")
    create = getattr(BatchOperation.objects, method)
    operation = create(
        context_object=post,
        operationtype="new-blogpost-email",
        started_by=user,
        input_data={"to": ["a@example.com"]},
    )
    loaded = BatchOperation.objects.get(pk=operation.pk)
    assert loaded.status == BatchOperation.STATUS_UNPROCESSED
    assert loaded.result == BatchOperation.RESULT_NOT_AVAILABLE
    assert loaded.started_running_datetime is None
    assert loaded.operationtype == "new-blogpost-email"
    assert loaded.context_object == post
    assert loaded.started_by == user
    assert loaded.input_data == {"to": ["a@example.com"]}


@override_settings(BATCHFRAMEWORK={"DEFAULT_QUEUE": "dq", "ROUTES": {"test-noop": "routed"}})
def test_create_asynchronous_stores_the_queue_enqueue_would():
    """Workers that take only their queues find the original's manual-flow operations too."""
    create = BatchOperation.objects.create_asyncronous
    assert create(operationtype="no-handler").queue == "dq"
    assert create(operationtype="test-noop").queue == "routed"
    assert create(operationtype="test-other-queue").queue == "other"
    assert create(operationtype="test-noop", queue="mine").queue == "mine"
    with override_settings(BATCHFRAMEWORK={"ROUTES": {"no-handler": "r"}}):
        assert create(operationtype="no-handler").queue == "r"
        assert create().queue == "default"


def test_the_manager_deconstructs_like_any_manager():
    """As a subclass with ``use_in_migrations`` needs: found where it is defined."""
    _as_manager, path, _queryset, _args, _kwargs = BatchOperation.objects.deconstruct()
    assert path == "batchframework.models.BatchOperationManager"


@pytest.mark.parametrize("method", ["create_synchronous", "create_syncronous"])
def test_create_synchronous_is_running_in_exactly_one_query(method, django_assert_num_queries):
    game = Game.objects.create()
    warm_content_types(Game)
    create = getattr(BatchOperation.objects, method)
    before = timezone.now()
    with django_assert_num_queries(1):
        operation = create(context_object=game, input_data={"players": 3})
    loaded = BatchOperation.objects.get(pk=operation.pk)
    assert loaded.status == BatchOperation.STATUS_RUNNING
    assert loaded.result == BatchOperation.RESULT_NOT_AVAILABLE
    assert before <= loaded.started_running_datetime <= timezone.now()
    assert loaded.context_object == game
    assert loaded.input_data == {"players": 3}


def test_the_seed_spellings_are_the_same_methods():
    manager = type(BatchOperation.objects)
    assert manager.create_asyncronous is manager.create_asynchronous
    assert manager.create_syncronous is manager.create_synchronous


# --- The manual flow: mark_as_running and finish. ---------------------------------------------


def test_mark_as_running_saves_status_and_start_time():
    operation = BatchOperation.objects.create_asynchronous()
    before = timezone.now()
    operation.mark_as_running()
    loaded = BatchOperation.objects.get(pk=operation.pk)
    assert loaded.status == BatchOperation.STATUS_RUNNING
    assert before <= loaded.started_running_datetime <= timezone.now()
    assert pks(BatchOperation.objects.running()) == {operation.pk}


@pytest.mark.parametrize("update_fields", [None, ["status"]])
def test_the_seeds_manual_flow_of_setting_status_and_saving_records_the_start_time(
    update_fields,
):
    # The seed's batching service does ``status = STATUS_RUNNING; save()`` and never sets
    # started_running_datetime; that must satisfy the batchop_started_has_datetime constraint.
    operation = BatchOperation.objects.create_asynchronous()
    operation.status = BatchOperation.STATUS_RUNNING
    before = timezone.now()
    operation.save(update_fields=update_fields)
    loaded = BatchOperation.objects.get(pk=operation.pk)
    assert loaded.status == BatchOperation.STATUS_RUNNING
    assert before <= loaded.started_running_datetime <= timezone.now()


def test_saving_keeps_a_start_time_that_is_set():
    started = timezone.now() - timedelta(hours=1)
    operation = BatchOperation.objects.create_synchronous(started_running_datetime=started)
    operation.save()
    assert BatchOperation.objects.get(pk=operation.pk).started_running_datetime == started


def test_finish_defaults_to_successful_without_output():
    operation = BatchOperation.objects.create_synchronous()
    started = operation.started_running_datetime
    operation.finish()
    loaded = BatchOperation.objects.get(pk=operation.pk)
    assert loaded.status == BatchOperation.STATUS_FINISHED
    assert loaded.result == BatchOperation.RESULT_SUCCESSFUL
    assert loaded.output_data is None
    assert started <= loaded.finished_datetime <= timezone.now()
    assert loaded.started_running_datetime == started


def test_finish_failed_with_output_data():
    operation = BatchOperation.objects.create_synchronous()
    operation.finish(failed=True, output_data={"errors": ["no email address"], "sent": 0})
    loaded = BatchOperation.objects.get(pk=operation.pk)
    assert loaded.status == BatchOperation.STATUS_FINISHED
    assert loaded.result == BatchOperation.RESULT_FAILED
    assert loaded.output_data == {"errors": ["no email address"], "sent": 0}


def test_finish_of_a_never_started_operation_sets_its_start_time():
    operation = BatchOperation.objects.create_asynchronous()
    operation.finish()
    loaded = BatchOperation.objects.get(pk=operation.pk)
    assert loaded.result == BatchOperation.RESULT_SUCCESSFUL
    assert loaded.started_running_datetime == loaded.finished_datetime


def test_finish_refuses_output_data_that_is_not_json_and_saves_nothing():
    operation = BatchOperation.objects.create_synchronous()
    with pytest.raises(InputDataError, match="output_data"):
        operation.finish(output_data={"when": timezone.now()})
    assert BatchOperation.objects.get(pk=operation.pk).status == BatchOperation.STATUS_RUNNING


# --- clean() and the database check constraints. ---------------------------------------------


def test_clean_requires_a_result_when_finished():
    operation = BatchOperation(
        status=BatchOperation.STATUS_FINISHED, started_running_datetime=timezone.now()
    )
    with pytest.raises(ValidationError) as excinfo:
        operation.clean()
    assert set(excinfo.value.message_dict) == {"result"}


@pytest.mark.parametrize("status", ["running", "finished"])
def test_clean_requires_a_start_time_when_running_or_finished(status):
    operation = BatchOperation(status=status, result=BatchOperation.RESULT_SUCCESSFUL)
    with pytest.raises(ValidationError) as excinfo:
        operation.clean()
    assert set(excinfo.value.message_dict) == {"started_running_datetime"}


def test_clean_reports_both_rules_at_once():
    operation = BatchOperation(status=BatchOperation.STATUS_FINISHED)
    with pytest.raises(ValidationError) as excinfo:
        operation.clean()
    assert set(excinfo.value.message_dict) == {"result", "started_running_datetime"}


@pytest.mark.parametrize(
    "values",
    [
        {"status": "unprocessed"},
        {"status": "running", "started_running_datetime": "now"},
        {"status": "finished", "result": "failed", "started_running_datetime": "now"},
    ],
)
def test_clean_accepts_consistent_operations(values):
    if values.get("started_running_datetime") == "now":
        values = {**values, "started_running_datetime": timezone.now()}
    BatchOperation(**values).clean()


def test_create_runs_clean_before_writing():
    with pytest.raises(ValidationError):
        BatchOperation.objects.create_asynchronous(status=BatchOperation.STATUS_RUNNING)
    assert BatchOperation.objects.count() == 0


CONSTRAINT_VIOLATIONS = [
    pytest.param(
        {"status": "bogus", "started_running_datetime": "now"},
        "batchop_status_valid",
        id="status-valid",
    ),
    pytest.param({"result": "bogus"}, "batchop_result_valid", id="result-valid"),
    pytest.param(
        {"status": "finished", "result": "not-available", "started_running_datetime": "now"},
        "batchop_finished_has_result",
        id="finished-has-result",
    ),
    pytest.param(
        {"status": "running", "started_running_datetime": None},
        "batchop_started_has_datetime",
        id="running-has-start",
    ),
    pytest.param(
        {"status": "finished", "result": "successful", "started_running_datetime": None},
        "batchop_started_has_datetime",
        id="finished-has-start",
    ),
]


def _resolve(values: dict) -> dict:
    return {key: timezone.now() if value == "now" else value for key, value in values.items()}


@pytest.mark.parametrize(("values", "constraint"), CONSTRAINT_VIOLATIONS)
def test_check_constraints_refuse_update_that_bypasses_clean(values, constraint):
    operation = BatchOperation.objects.create_asynchronous()
    with pytest.raises(IntegrityError, match=constraint), transaction.atomic():
        BatchOperation.objects.filter(pk=operation.pk).update(**_resolve(values))
    loaded = BatchOperation.objects.get(pk=operation.pk)
    assert (loaded.status, loaded.result) == ("unprocessed", "not-available")


@pytest.mark.parametrize(("values", "constraint"), CONSTRAINT_VIOLATIONS)
def test_check_constraints_refuse_bulk_create_that_bypasses_clean(values, constraint):
    with pytest.raises(IntegrityError, match=constraint), transaction.atomic():
        BatchOperation.objects.bulk_create([BatchOperation(**_resolve(values))])
    assert BatchOperation.objects.count() == 0


def test_check_constraints_accept_consistent_rows():
    now = timezone.now()
    BatchOperation.objects.bulk_create(
        [
            BatchOperation(status="unprocessed"),
            BatchOperation(status="running", started_running_datetime=now),
            BatchOperation(status="finished", result="failed", started_running_datetime=now),
        ]
    )
    assert BatchOperation.objects.count() == 3


# --- JSON data. -------------------------------------------------------------------------------


JSON_VALUES = [
    {"a": 1, "nested": {"list": [1, 2.5, "three", None, True, False]}},
    ["x", {"y": []}],
    "just a string with ünïcødé and emoji 🎉",
    12345678901234567890,
    -7,
    True,
    {},
    [],
]


@pytest.mark.parametrize("value", JSON_VALUES)
def test_input_data_is_stored_as_python_objects(value):
    operation = BatchOperation.objects.create_asynchronous(input_data=value)
    assert BatchOperation.objects.get(pk=operation.pk).input_data == value


def test_input_data_json_reads_as_json_text():
    operation = BatchOperation.objects.create_asynchronous(input_data={"b": [1, "two"]})
    loaded = BatchOperation.objects.get(pk=operation.pk)
    assert isinstance(loaded.input_data_json, str)
    assert json.loads(loaded.input_data_json) == {"b": [1, "two"]}
    assert BatchOperation.objects.create_asynchronous().input_data_json == ""


def test_input_data_json_can_be_set_as_json_text():
    operation = BatchOperation.objects.create_asynchronous()
    operation.input_data_json = '{"emails": ["a@example.com"], "n": 2}'
    assert operation.input_data == {"emails": ["a@example.com"], "n": 2}
    operation.save()
    assert BatchOperation.objects.get(pk=operation.pk).input_data == {
        "emails": ["a@example.com"],
        "n": 2,
    }
    operation.input_data_json = ""
    operation.save()
    assert BatchOperation.objects.get(pk=operation.pk).input_data is None


@pytest.mark.parametrize("method", ["create_asynchronous", "create_asyncronous"])
def test_the_create_methods_take_json_text_as_the_original_did(method):
    """``input_data_json`` as a creation argument was stored as ``None``: the JSON value given
    with it was overwritten."""
    create = getattr(BatchOperation.objects, method)
    operation = create(operationtype="x", input_data_json='{"a": 1}', output_data_json="[2]")
    loaded = BatchOperation.objects.get(pk=operation.pk)
    assert (loaded.input_data, loaded.output_data) == ({"a": 1}, [2])
    assert (operation.input_data, operation.output_data) == ({"a": 1}, [2])


def test_json_text_to_the_create_methods_is_validated_like_the_value():
    create = BatchOperation.objects.create_asynchronous
    with pytest.raises(InvalidOperationError, match="input_data_json"):
        create(operationtype="x", input_data_json="{not json")
    with pytest.raises(InvalidOperationError, match="either input_data or input_data_json"):
        create(operationtype="x", input_data={"a": 1}, input_data_json='{"a": 1}')
    with (
        override_settings(BATCHFRAMEWORK={"MAX_INPUT_BYTES": 10}),
        pytest.raises(InputDataError, match="MAX_INPUT_BYTES"),
    ):
        create(operationtype="x", input_data_json=json.dumps("x" * 20))
    with pytest.raises(InputDataError, match="output_data"):
        create(operationtype="x", output_data_json="[NaN]")
    assert BatchOperation.objects.count() == 0


def test_output_data_json_is_readable_and_settable():
    operation = BatchOperation.objects.create_synchronous()
    assert operation.output_data_json == ""
    operation.output_data_json = '[1, {"ok": true}]'
    assert operation.output_data == [1, {"ok": True}]
    operation.finish()
    loaded = BatchOperation.objects.get(pk=operation.pk)
    assert loaded.output_data == [1, {"ok": True}]
    assert json.loads(loaded.output_data_json) == [1, {"ok": True}]


# --- __str__. ---------------------------------------------------------------------------------


def test_str_names_type_id_status_and_result():
    operation = BatchOperation.objects.create_asynchronous(operationtype="new-blogpost-email")
    assert str(operation) == f"new-blogpost-email #{operation.pk} (unprocessed)"
    operation.finish(failed=True)
    assert str(operation) == f"new-blogpost-email #{operation.pk} (finished, failed)"
    untyped = BatchOperation.objects.create_synchronous()
    assert str(untyped) == f"batch operation #{untyped.pk} (running)"


# --- The synchronous() context manager. -------------------------------------------------------


def test_synchronous_block_finishes_successful():
    game = Game.objects.create()
    with BatchOperation.objects.synchronous(context_object=game, operationtype="deal") as op:
        assert BatchOperation.objects.get(pk=op.pk).status == BatchOperation.STATUS_RUNNING
    loaded = BatchOperation.objects.get(pk=op.pk)
    assert loaded.status == BatchOperation.STATUS_FINISHED
    assert loaded.result == BatchOperation.RESULT_SUCCESSFUL
    assert loaded.context_object == game


def test_synchronous_block_that_raises_finishes_failed_and_reraises():
    class DealingError(Exception):
        pass

    with (
        pytest.raises(DealingError, match="out of cards"),
        BatchOperation.objects.synchronous(operationtype="deal") as op,
    ):
        raise DealingError("out of cards")
    loaded = BatchOperation.objects.get(pk=op.pk)
    assert loaded.status == BatchOperation.STATUS_FINISHED
    assert loaded.result == BatchOperation.RESULT_FAILED
    error = loaded.output_data["error"]
    assert error["type"].endswith("DealingError")
    assert error["message"] == "out of cards"
    assert "DealingError: out of cards" in error["traceback"]
    assert "Traceback" in error["traceback"]
    assert loaded.error == error


def test_synchronous_block_whose_error_broke_the_transaction_raises_that_error():
    """Recording the failure needs a working transaction; without one the caller got a
    TransactionManagementError in place of the IntegrityError that caused it."""
    game = Game.objects.create()
    with (
        pytest.raises(IntegrityError),
        transaction.atomic(),
        BatchOperation.objects.synchronous(operationtype="deal"),
    ):
        Game.objects.create(pk=game.pk)  # a duplicate primary key
    assert BatchOperation.objects.count() == 0  # rolled back with the block's writes


def test_synchronous_block_that_finishes_itself_is_left_as_it_finished():
    with BatchOperation.objects.synchronous() as op:
        op.finish(failed=True, output_data={"why": "by hand"})
    loaded = BatchOperation.objects.get(pk=op.pk)
    assert loaded.result == BatchOperation.RESULT_FAILED
    assert loaded.output_data == {"why": "by hand"}


# --- Bad input is refused before anything is written. -----------------------------------------


@pytest.mark.parametrize("method", ["create_asynchronous", "create_synchronous"])
def test_a_model_instance_as_context_object_id_is_the_context_object(method):
    """The original's example passes the object itself as ``context_object_id``."""
    post = Post.objects.create(title="p")
    operation = getattr(BatchOperation.objects, method)(context_object_id=post, operationtype="x")
    loaded = BatchOperation.objects.get(pk=operation.pk)
    assert loaded.context_object == post
    assert loaded.context_object_id == str(post.pk)
    assert pks(BatchOperation.objects.for_context_object(post)) == {operation.pk}


def test_a_model_instance_assigned_to_context_object_id_is_the_context_object_on_save():
    thing = StringThing.objects.create(pk="a-key")
    operation = BatchOperation(context_object_id=thing)
    operation.save()
    assert BatchOperation.objects.get(pk=operation.pk).context_object == thing


def test_a_context_object_given_twice_or_unsaved_is_refused():
    post = Post.objects.create(title="p")
    create = BatchOperation.objects.create_asynchronous
    with pytest.raises(InvalidOperationError, match="either context_object"):
        create(operationtype="x", context_object_id=post, context_object=post)
    for unsaved in ({"context_object_id": Post(title="u")}, {"context_object": Post(title="u")}):
        with pytest.raises(InvalidOperationError, match="must be saved"):
            create(operationtype="x", **unsaved)
    assert BatchOperation.objects.count() == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"run_after": datetime(2030, 1, 1)}, id="naive-run_after"),
        pytest.param({"operationtype": "x" * 256}, id="operationtype-too-long"),
        pytest.param({"queue": "q" * 101}, id="queue-too-long"),
        pytest.param({"queue": ""}, id="queue-empty"),
        pytest.param({"priority": 10**6}, id="priority-out-of-range"),
        pytest.param({"result": "bogus"}, id="result-not-a-choice"),
        pytest.param({"status": "bogus"}, id="status-not-a-choice"),
        pytest.param({"attempts": -1}, id="attempts-negative"),
        pytest.param({"status": "finished"}, id="finished-without-result"),
    ],
)
@pytest.mark.parametrize("method", ["create_asynchronous", "create_synchronous"])
def test_invalid_fields_to_the_create_methods_raise_before_writing(method, kwargs):
    with pytest.raises(InvalidOperationError) as excinfo:
        getattr(BatchOperation.objects, method)(**kwargs)
    assert isinstance(excinfo.value, ValidationError)  # and Django's, for forms and admin code
    assert next(iter(kwargs)) in str(excinfo.value) or "result" in str(excinfo.value)
    assert BatchOperation.objects.count() == 0


def _unsaved_user():
    return get_user_model()(username="nobody")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        pytest.param(lambda: {"last_error": "a\x00b"}, "last_error", id="nul-in-text"),
        pytest.param(lambda: {"progress_message": "\x00"}, "progress_message", id="nul-message"),
        pytest.param(lambda: {"run_after": "2020-01-01 00:00"}, "run_after", id="naive-string"),
        pytest.param(
            lambda: {"run_after": datetime(9999, 6, 1, tzinfo=UTC)}, "run_after", id="year-9999"
        ),
        pytest.param(lambda: {"started_by": AnonymousUser()}, "started_by", id="anonymous-user"),
        pytest.param(lambda: {"started_by": _unsaved_user()}, "started_by", id="unsaved-user"),
        pytest.param(lambda: {"started_by_id": 999_999}, "started_by", id="missing-user-id"),
        pytest.param(lambda: {"started_by_id": "abc"}, "started_by", id="user-id-not-a-number"),
        pytest.param(
            lambda: {"context_content_type_id": 999_999},
            "context_content_type",
            id="missing-content-type-id",
        ),
        pytest.param(lambda: {"no_such_field": 1}, "no_such_field", id="unknown-field"),
    ],
)
@pytest.mark.parametrize("method", ["create_asynchronous", "create_synchronous"])
def test_what_the_database_would_refuse_is_refused_before_writing(method, kwargs, field):
    """These reached the database (a raw DataError, IntegrityError, or a ValueError, breaking
    a caller's transaction) or were stored as a naive time; now they are field errors."""
    with transaction.atomic():
        with pytest.raises(InvalidOperationError) as excinfo:
            getattr(BatchOperation.objects, method)(operationtype="x", **kwargs())
        assert isinstance(excinfo.value, ValidationError)
        assert field in str(excinfo.value)
        assert BatchOperation.objects.count() == 0  # and the transaction is still usable


@pytest.mark.parametrize("method", ["create_asynchronous", "create_synchronous"])
def test_output_data_to_the_create_methods_is_validated_like_input_data(method):
    with pytest.raises(InputDataError, match="output_data"):
        getattr(BatchOperation.objects, method)(operationtype="x", output_data={"a": math.nan})
    assert BatchOperation.objects.count() == 0


def test_a_finish_refused_for_its_output_keeps_the_operation_finishable():
    """The refused value was kept on the instance, and every later finish() failed on it."""
    operation = BatchOperation.objects.create_synchronous(operationtype="x")
    with pytest.raises(InputDataError):
        operation.finish(output_data={"x": object()})
    operation.finish(failed=True)
    assert BatchOperation.objects.get(pk=operation.pk).result == BatchOperation.RESULT_FAILED


def test_a_synchronous_block_that_leaves_unstorable_output_finishes_failed():
    with (
        pytest.raises(InputDataError),
        BatchOperation.objects.synchronous(operationtype="x") as operation,
    ):
        operation.output_data = {"n": math.nan}
    loaded = BatchOperation.objects.get(pk=operation.pk)
    assert (loaded.status, loaded.result) == ("finished", "failed")
    assert loaded.error["type"].endswith("InputDataError")


def test_a_synchronous_block_whose_error_message_holds_a_nul_is_recorded():
    """PostgreSQL refused to store such a message: the caller got that error instead of the
    block's, and the operation stayed running."""
    with (
        pytest.raises(ValueError, match="a\x00b"),
        BatchOperation.objects.synchronous(operationtype="x") as operation,
    ):
        raise ValueError("a\x00b\ud800")
    error = BatchOperation.objects.get(pk=operation.pk).error
    assert error["message"] == "a\\x00b\\ud800"  # escaped, as text


@pytest.mark.parametrize("how", ["distinct", "annotate", "alias"])
def test_a_queryset_delete_that_cannot_lock_rows_still_deletes(django_user_model, how):
    """FOR UPDATE goes with neither DISTINCT nor GROUP BY (PostgreSQL): such a delete is done
    as Django does it."""
    from django.db.models import Count, Max

    user = django_user_model.objects.create(username="u")
    BatchOperation.objects.create_asynchronous(operationtype="x", started_by=user)
    BatchOperation.objects.create_asynchronous(operationtype="y")
    rows = {
        "distinct": BatchOperation.objects.filter(started_by__username="u").distinct(),
        "annotate": BatchOperation.objects.annotate(m=Max("started_by__id")).filter(
            m__isnull=False
        ),
        "alias": BatchOperation.objects.alias(m=Count("started_by")).filter(m=1),
    }[how]
    _deleted, by_model = rows.delete()
    assert by_model.get("batchframework.BatchOperation") == 1
    assert list(BatchOperation.objects.values_list("operationtype", flat=True)) == ["y"]


def test_finish_validates_output_data_assigned_before_it():
    operation = BatchOperation.objects.create_synchronous(operationtype="x")
    operation.output_data = {"a": math.nan}
    with pytest.raises(InputDataError, match="output_data"):
        operation.finish()
    assert BatchOperation.objects.get(pk=operation.pk).status == BatchOperation.STATUS_RUNNING


def test_a_given_user_and_content_type_id_cost_a_query_only_when_given_as_ids(
    django_user_model, django_assert_num_queries
):
    user = django_user_model.objects.create(username="starter")
    with django_assert_num_queries(1):
        BatchOperation.objects.create_synchronous(operationtype="x", started_by=user)
    with django_assert_num_queries(2):
        operation = BatchOperation.objects.create_synchronous(
            operationtype="x", started_by_id=user.pk
        )
    assert BatchOperation.objects.get(pk=operation.pk).started_by == user


@pytest.mark.parametrize(
    "input_data",
    [
        pytest.param(datetime(2024, 1, 1, tzinfo=UTC), id="datetime"),
        pytest.param({"when": datetime(2024, 1, 1, tzinfo=UTC)}, id="nested-datetime"),
        pytest.param(object(), id="object"),
        pytest.param(float("nan"), id="nan"),
        pytest.param([1, float("inf")], id="infinity"),
        pytest.param({"id": uuid.uuid4()}, id="uuid"),
        pytest.param({1: "int key"}, id="non-string-key"),
        pytest.param({"text": "nul\x00byte"}, id="nul-character"),
        pytest.param({"text": "\ud800"}, id="lone-surrogate"),
        pytest.param(json.loads("[" * 32 + "]" * 32), id="nested-too-deep"),
    ],
)
@pytest.mark.parametrize("method", ["create_asynchronous", "create_synchronous"])
def test_unserializable_input_data_is_refused_without_a_query(
    method, input_data, django_assert_num_queries
):
    create = getattr(BatchOperation.objects, method)
    with django_assert_num_queries(0), pytest.raises(InputDataError, match="input_data"):
        create(input_data=input_data, operationtype="x")
    assert BatchOperation.objects.count() == 0


@override_settings(BATCHFRAMEWORK={"MAX_INPUT_BYTES": 100})
def test_input_data_larger_than_max_input_bytes_is_refused(django_assert_num_queries):
    too_big = {"text": "x" * 100}
    with django_assert_num_queries(0), pytest.raises(InputDataError, match="MAX_INPUT_BYTES"):
        BatchOperation.objects.create_asynchronous(input_data=too_big)
    assert BatchOperation.objects.count() == 0
    fits = {"text": "x" * 50}
    assert BatchOperation.objects.create_asynchronous(input_data=fits).input_data == fits


def test_max_input_bytes_default_accepts_ordinary_input():
    big = {"rows": ["x" * 100] * 100}
    operation = BatchOperation.objects.create_asynchronous(input_data=big)
    assert BatchOperation.objects.get(pk=operation.pk).input_data == big
