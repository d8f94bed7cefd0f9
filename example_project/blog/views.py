"""Blog views: thin wrappers over :mod:`blog.services`."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from batchframework import CancelOutcome

from . import services
from .forms import PostForm
from .models import Post

CANCEL_MESSAGES = {
    CancelOutcome.CANCELLED: "The notification is cancelled; it will not be sent.",
    CancelOutcome.TOO_LATE_RUNNING: "Too late: the notification is being sent right now.",
    CancelOutcome.TOO_LATE_FINISHED: "Too late: the notification was already sent.",
    CancelOutcome.NOT_FOUND: "There is no pending notification for this post.",
}


def post_list(request: HttpRequest) -> HttpResponse:
    return render(request, "blog/post_list.html", {"posts": Post.objects.select_related("author")})


def post_detail(request: HttpRequest, pk: int) -> HttpResponse:
    post = get_object_or_404(Post, pk=pk)
    pending = services.pending_notification(post) if post.author_id == request.user.pk else None
    return render(request, "blog/post_detail.html", {"post": post, "pending": pending})


@login_required
def post_create(request: HttpRequest) -> HttpResponse:
    form = PostForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        post, operation = services.create_post(request.user, **form.cleaned_data)
        messages.info(
            request, f"Saved. Readers get an email at {operation.run_after:%H:%M:%S} UTC."
        )
        return redirect(post)
    return render(request, "blog/post_form.html", {"form": form})


def _own_post(request: HttpRequest, pk: int) -> Post:
    # Someone else's post is "not found" for editing: its existence is not a secret, but
    # the edit and cancel actions should not tell strangers anything either.
    return get_object_or_404(Post, pk=pk, author=request.user)


@login_required
def post_edit(request: HttpRequest, pk: int) -> HttpResponse:
    post = _own_post(request, pk)
    form = PostForm(request.POST or None, instance=post)
    if request.method == "POST" and form.is_valid():
        postponed = services.update_post(post, **form.cleaned_data)
        if postponed is not None:
            messages.info(
                request, f"Saved. The email now goes at {postponed.run_after:%H:%M:%S} UTC."
            )
        else:
            messages.info(request, "Saved.")
        return redirect(post)
    return render(request, "blog/post_form.html", {"form": form, "post": post})


@login_required
@require_POST
def cancel_notification(request: HttpRequest, pk: int) -> HttpResponse:
    outcome = services.cancel_notification(_own_post(request, pk))
    messages.info(request, CANCEL_MESSAGES[outcome])
    return redirect("blog:post_detail", pk=pk)
