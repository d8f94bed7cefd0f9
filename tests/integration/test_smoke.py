from datetime import timedelta

import pytest
from django.utils import timezone

from batchframework import BatchOperation, enqueue
from batchframework.testing import run_due
from tests.testapp.models import Post

pytestmark = pytest.mark.django_db(transaction=True)


def test_enqueue_and_run_due():
    post = Post.objects.create(title="x")
    op = enqueue("test-echo", context_object=post, input_data={"a": 1}, delay=timedelta(minutes=15))
    assert run_due() == []
    ran = run_due(now=timezone.now() + timedelta(minutes=16))
    assert [o.pk for o in ran] == [op.pk]
    op.refresh_from_db()
    assert op.status == "finished" and op.result == "successful"
    assert op.output_data == {"echo": {"a": 1}}
    assert list(BatchOperation.objects.for_context_object(post)) == [op]
