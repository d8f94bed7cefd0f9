"""The blog's batch handlers, discovered by batchframework when the app registry is ready."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.mail import EmailMessage

from batchframework import BatchOperation, handler

from .services import NOTIFICATION


def notification_subject(post: Any) -> str:
    """The subject names the post's id, so the demo can count the emails of each post. A title
    is one line here whatever was posted: a line break in a header is refused by Django."""
    title = " ".join(post.title.split())
    return f"New blog post: {title} [post #{post.pk}]"


@handler(NOTIFICATION)
def send_new_blogpost_email(operation: BatchOperation) -> dict[str, Any]:
    """Email every other active user with an address about the post."""
    post = operation.context_object
    if post is None:  # the post was deleted after the email was scheduled
        return {"sent_to": [], "skipped": "post deleted"}
    recipients = sorted(
        get_user_model()
        .objects.filter(is_active=True)
        .exclude(pk=post.author_id)
        .exclude(email="")
        .values_list("email", flat=True)
    )
    if recipients:
        # One message, the readers in Bcc: no reader learns the others' addresses.
        EmailMessage(
            notification_subject(post), f"{post.author} wrote:\n\n{post.body}", bcc=recipients
        ).send()
    return {"sent_to": recipients}
