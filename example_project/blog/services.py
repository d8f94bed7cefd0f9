"""What the blog's views do, as functions the demo and the tests call too.

Creating a post enqueues its notification email ``BLOG_NOTIFICATION_DELAY`` seconds later;
editing it within that window postpones the email; the author may cancel it until it is sent.
"""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction

from batchframework import BatchOperation, CancelOutcome, enqueue

from .models import Post

NOTIFICATION = "new-blogpost-email"


def notification_delay() -> timedelta:
    return timedelta(seconds=settings.BLOG_NOTIFICATION_DELAY)


def create_post(author: AbstractBaseUser, title: str, body: str) -> tuple[Post, BatchOperation]:
    """Save a post and schedule its notification, in one transaction: if the request fails
    after this, neither the post nor the email exist (the dispatch happens on commit)."""
    with transaction.atomic():
        post = Post.objects.create(author=author, title=title, body=body)
        operation = enqueue(
            NOTIFICATION,
            context_object=post,
            delay=notification_delay(),
            started_by=author,
            # At most one pending notification per post, even if this is called twice.
            replace=True,
        )
    return post, operation


def pending_notification(post: Post) -> BatchOperation | None:
    """The post's notification if it has not started yet."""
    return (
        BatchOperation.objects.for_context_object(post)
        .unprocessed()
        .filter(operationtype=NOTIFICATION)
        .first()
    )


def update_post(post: Post, *, title: str, body: str) -> BatchOperation | None:
    """Save the edit and postpone a pending notification to a full delay from now.

    Returns the postponed operation, or ``None`` when the email already went (or was
    cancelled): an edit after the window sends nothing new. ``postpone`` changes the row only
    while it is still unprocessed, so an edit racing the worker never causes a second email
    (``enqueue(replace=True)`` would insert a new one once the first was claimed).
    """
    with transaction.atomic():
        post.title, post.body = title, body
        post.save(update_fields=["title", "body", "updated_datetime"])
        operation = pending_notification(post)
        if operation is not None and operation.postpone(notification_delay()):
            return operation
    return None


def cancel_notification(post: Post) -> CancelOutcome:
    """Make sure the post's notification is never sent, if it has not started yet."""
    operation = pending_notification(post)
    if operation is None:
        return CancelOutcome.NOT_FOUND
    return operation.cancel()
