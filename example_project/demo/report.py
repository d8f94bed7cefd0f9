"""The demo's summary table and its checks: what should have run ran exactly once, on time and
never early; what was cancelled never ran; the bulk deal stayed within five queries."""

from __future__ import annotations

import dataclasses
import email
import re
from collections import Counter
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import reverse
from game.models import Card, Player

from batchframework import BatchOperation

from .scenario import DemoRun, seconds_after

#: The file email backend separates messages in a file with this line.
EMAIL_SEPARATOR = "\n" + "-" * 79 + "\n"
POST_ID_IN_SUBJECT = re.compile(r"\[post #(\d+)\]")


@dataclasses.dataclass(frozen=True)
class Check:
    description: str
    passed: bool
    detail: str = ""


def emails_per_post(folder: Path) -> Counter[int]:
    """How many notification emails the file backend wrote for each post id."""
    counts: Counter[int] = Counter()
    if not folder.exists():
        return counts
    for path in folder.glob("*.log"):
        for chunk in path.read_text(errors="replace").split(EMAIL_SEPARATOR):
            if not chunk.strip():
                continue
            subject = str(email.message_from_string(chunk).get("Subject", ""))
            match = POST_ID_IN_SUBJECT.search(subject)
            if match:
                counts[int(match.group(1))] += 1
    return counts


def lateness_ms(operation: BatchOperation) -> float | None:
    if operation.started_running_datetime is None:
        return None
    return (operation.started_running_datetime - operation.run_after) / timedelta(milliseconds=1)


def summary_table(run: DemoRun) -> str:
    """One line per operation the demo started (cancelled ones no longer exist)."""
    labels = {p.operation_id: f"post {p.post.pk}" for p in run.posts}
    labels.update({d.operation_id: f"game {d.game.pk}" for d in run.deals})
    if run.sync_deal is not None:
        labels[run.sync_deal.operation.pk] = f"game {run.sync_deal.operation.context_object_id}"
    operations = {op.pk: op for op in BatchOperation.objects.filter(pk__in=run.operation_ids())}
    header = (
        f"{'id':>4}  {'operationtype':<20} {'concerns':<9} {'status':<11} {'result':<13} "
        f"{'due':>8} {'started':>8} {'late ms':>8}  output"
    )
    lines = [header, "-" * len(header)]
    for pk in sorted(labels):
        operation = operations.get(pk)
        if operation is None:
            lines.append(
                f"{pk:>4}  {'new-blogpost-email':<20} {labels[pk]:<9} "
                "cancelled (the row was deleted: it never runs)"
            )
            continue
        late = lateness_ms(operation)
        lines.append(
            f"{pk:>4}  {operation.operationtype:<20} {labels[pk]:<9} {operation.status:<11} "
            f"{operation.result:<13} {seconds_after(run.started_at, operation.run_after):>8} "
            f"{seconds_after(run.started_at, operation.started_running_datetime):>8} "
            f"{format_ms(late):>8}  {short_output(operation.output_data)}"
        )
    return "\n".join(lines)


def format_ms(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.0f}".replace("-0", "0") if abs(value) < 0.5 else f"{value:.0f}"


def short_output(output: object) -> str:
    if isinstance(output, dict) and "sent_to" in output:
        return f"sent_to={','.join(output['sent_to'])}"
    return str(output)[:50]


def run_checks(run: DemoRun, *, poll_ticks: int) -> list[Check]:
    checks: list[Check] = []
    emails = emails_per_post(Path(settings.EMAIL_FILE_PATH))
    expected = run.expected_to_run()
    operations = {op.pk: op for op in BatchOperation.objects.filter(pk__in=run.operation_ids())}

    for pk in expected:
        operation = operations.get(pk)
        ok = (
            operation is not None
            and operation.status == BatchOperation.STATUS_FINISHED
            and operation.result == BatchOperation.RESULT_SUCCESSFUL
            and operation.attempts == 1
        )
        checks.append(
            Check(
                f"operation #{pk} ran once and succeeded",
                ok,
                ""
                if ok
                else f"{operation and (operation.status, operation.result, operation.attempts)}",
            )
        )
        if operation is not None and operation.started_running_datetime is not None:
            late = lateness_ms(operation) or 0.0
            checks.append(
                Check(f"operation #{pk} did not start early", late >= 0, f"{late:.0f} ms")
            )

    for demo_post in run.posts:
        count = emails.get(demo_post.post.pk, 0)
        if demo_post.expect_email:
            checks.append(
                Check(
                    f"post {demo_post.post.pk} {demo_post.title!r}: exactly one email",
                    count == 1,
                    f"{count} sent",
                )
            )
            operation = operations.get(demo_post.operation_id or 0)
            if demo_post.last_edit_at is not None and operation is not None:
                earliest = demo_post.last_edit_at + timedelta(
                    seconds=settings.BLOG_NOTIFICATION_DELAY
                )
                ok = (
                    operation.run_after >= earliest
                    and operation.started_running_datetime >= earliest
                )
                checks.append(
                    Check(
                        f"post {demo_post.post.pk}: the edit postponed its email",
                        ok,
                        f"due {operation.run_after:%H:%M:%S.%f}, not before {earliest:%H:%M:%S.%f}",
                    )
                )
        else:
            left = BatchOperation.objects.for_context_object(demo_post.post).count()
            checks.append(
                Check(
                    f"post {demo_post.post.pk} {demo_post.title!r}: cancelled, no email",
                    count == 0 and left == 0,
                    f"{count} sent, {left} operation rows left",
                )
            )
        if demo_post.expect_email and demo_post.cancel_messages:
            checks.append(
                Check(
                    f"post {demo_post.post.pk}: cancelling after the email went was refused",
                    "no pending notification" in demo_post.cancel_messages[-1].lower()
                    or "too late" in demo_post.cancel_messages[-1].lower(),
                    demo_post.cancel_messages[-1],
                )
            )

    if run.sync_deal is not None:
        deal = run.sync_deal
        players = Player.objects.filter(batchoperation=deal.operation).count()
        cards = Card.objects.filter(player__batchoperation=deal.operation).count()
        checks.append(
            Check(
                f"synchronous deal: {run.sync_deal_players} players and cards in <= 5 queries",
                deal.queries <= 5 and players == cards == run.sync_deal_players,
                f"{deal.queries} queries, {players} players, {cards} cards",
            )
        )
    for deal in run.deals:
        players = Player.objects.filter(batchoperation_id=deal.operation_id).count()
        operation = operations.get(deal.operation_id)
        progress = (operation.progress_done, operation.progress_total) if operation else None
        checks.append(
            Check(
                f"background deal #{deal.operation_id}: {deal.players} players, progress complete",
                players == deal.players and progress == (deal.players, deal.players),
                f"{players} players, progress {progress}",
            )
        )

    checks.append(
        Check("celery beat ran the batchframework poller", poll_ticks > 0, f"{poll_ticks} ticks")
    )
    checks.extend(json_endpoint_checks(run))
    return checks


def json_endpoint_checks(run: DemoRun) -> list[Check]:
    """The polling endpoint: the owner sees the result; another user and bad ids get 404."""
    pk = run.expected_to_run()[0]
    url = reverse("operations:detail", args=[pk])
    owner = Client()
    owner.force_login(run.author)
    response = owner.get(url)
    data = response.json() if response.status_code == 200 else {}
    stranger = Client()
    stranger.force_login(get_user_model().objects.get(username="alice"))
    return [
        Check(
            f"GET {url} as the owner shows the result",
            data.get("status") == "finished" and "output_data" in data,
            f"{response.status_code} {data}"[:120],
        ),
        Check(f"GET {url} as another user is 404", stranger.get(url).status_code == 404),
        Check("GET /operations/abc/ is 404", owner.get("/operations/abc/").status_code == 404),
    ]
