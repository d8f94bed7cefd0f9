"""What the demo does, on a timeline, through the project's real views (Django's test client).

Posts are written, edited (postponing their email) and have their email cancelled; games are
dealt synchronously (counting queries) and in the background (reporting progress), some due at
once, some within the dispatch horizon (a Celery ETA message), some beyond it (the beat poller
hands them to Celery as they come due). Meanwhile a watcher prints every change of status and
progress it sees in the database.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from blog.models import Post
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.messages import get_messages
from django.test import Client
from django.urls import resolve, reverse
from django.utils import timezone
from game.models import Game
from game.services import MeasuredDeal, measure_deal

from batchframework import BatchOperation

Printer = Callable[[str], None]


@dataclasses.dataclass
class DemoPost:
    """A post the demo wrote, and what it expects of its notification."""

    title: str
    post: Post
    operation_id: int | None
    expect_email: bool = True
    #: When the last edit request started: the email must not go before this + the delay.
    last_edit_at: datetime | None = None
    cancel_messages: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class DemoDeal:
    """A background deal the demo started, and how many players it should add."""

    game: Game
    operation_id: int
    players: int
    delay: float


@dataclasses.dataclass
class DemoRun:
    """Everything the scenario made, for the report and the checks."""

    started_at: datetime
    author: Any
    reader_emails: list[str]
    posts: list[DemoPost] = dataclasses.field(default_factory=list)
    deals: list[DemoDeal] = dataclasses.field(default_factory=list)
    sync_deal: MeasuredDeal | None = None
    sync_deal_players: int = 0

    def operation_ids(self) -> list[int]:
        ids = [p.operation_id for p in self.posts if p.operation_id is not None]
        ids += [d.operation_id for d in self.deals]
        if self.sync_deal is not None:
            ids.append(self.sync_deal.operation.pk)
        return sorted(ids)

    def expected_to_run(self) -> list[int]:
        ids = [p.operation_id for p in self.posts if p.expect_email and p.operation_id]
        return sorted([*ids, *(d.operation_id for d in self.deals)])


class ProgressWatcher:
    """Prints each change of status or progress of the watched operations."""

    def __init__(self, run: DemoRun, say: Printer) -> None:
        self.run = run
        self.say = say
        self.seen: dict[int, tuple[Any, ...]] = {}

    def look(self) -> None:
        ids = self.run.operation_ids()
        for operation in BatchOperation.objects.filter(pk__in=ids).order_by("pk"):
            state = (operation.status, operation.result, operation.progress_done)
            if self.seen.get(operation.pk) == state:
                continue
            self.seen[operation.pk] = state
            self.say(
                f"#{operation.pk:<3} {operation.operationtype:<19} {describe_state(operation)}"
            )

    def watch_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            self.look()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.2, left))

    def watch_until(self, condition: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.look()
            if condition():
                return True
            time.sleep(0.2)
        self.look()
        return condition()


def describe_state(operation: BatchOperation) -> str:
    if operation.status == BatchOperation.STATUS_FINISHED:
        output = operation.output_data or {}
        if "sent_to" in output:
            detail = f"emailed {', '.join(output['sent_to'])}"
        elif "players" in output:
            detail = f"{output['players']} players, {output.get('cards', 0)} cards"
        else:
            detail = str(output)[:60]
        return f"finished {operation.result}: {detail}"
    if operation.status == BatchOperation.STATUS_RUNNING and operation.progress_total:
        bar = progress_bar(operation.progress_done or 0, operation.progress_total)
        return f"running  {bar} {operation.progress_message}"
    if operation.status == BatchOperation.STATUS_RUNNING:
        return "running"
    return f"waiting, due at {operation.run_after:%H:%M:%S.%f}"[:-3] + " UTC"


def progress_bar(done: int, total: int, width: int = 20) -> str:
    filled = round(width * done / total) if total else 0
    return "[" + "#" * filled + "." * (width - filled) + "]"


class Scenario:
    """The demo's timeline. Call :meth:`run`; it returns a :class:`DemoRun` once every
    operation that should run has finished (or the timeout passed)."""

    def __init__(self, say: Printer) -> None:
        self._say = say
        self.t0 = time.monotonic()
        self.delay = float(settings.BLOG_NOTIFICATION_DELAY)

    def say(self, text: str) -> None:
        self._say(f"{time.monotonic() - self.t0:6.2f}s  {text}")

    # --- The steps ---------------------------------------------------------------------------
    def run(self, *, finish_timeout: float = 40.0) -> DemoRun:
        users = get_user_model().objects
        author, _ = users.get_or_create(username="demo", defaults={"email": "demo@example.com"})
        readers = []
        for name in ("alice", "bob"):
            reader, _ = users.get_or_create(
                username=name, defaults={"email": f"{name}@example.com"}
            )
            readers.append(reader)
        run = DemoRun(
            started_at=timezone.now(), author=author, reader_emails=sorted(r.email for r in readers)
        )
        self.t0 = time.monotonic()
        self.client = Client()
        self.client.force_login(author)
        self.watcher = ProgressWatcher(run, self.say)

        self.say(
            f"writing 5 posts; each emails the readers {self.delay:g}s later "
            "unless edited or cancelled"
        )
        welcome = self.create_post(run, "Welcome to the blog")
        edited = self.create_post(run, "Edited once")
        cancelled = self.create_post(run, "Cancelled", expect_email=False)
        twice = self.create_post(run, "Edited twice")
        edit_then_cancel = self.create_post(run, "Edited, then cancelled", expect_email=False)

        game = Game.objects.create(name="Synchronous deal")
        # 300 players fit one INSERT on every database (SQLite before Django 6.0 takes 999
        # parameters per statement); more would add an INSERT per extra batch there.
        run.sync_deal_players = 300
        run.sync_deal = measure_deal(game, run.sync_deal_players, seed=1)
        self.say(
            f"dealt {run.sync_deal_players} players one card each synchronously in "
            f"{run.sync_deal.queries} queries ({', '.join(run.sync_deal.statements)}), "
            f"operation #{run.sync_deal.operation.pk}"
        )
        for delay, players, label in (
            (0, 300, "due now"),
            (3, 200, "ETA within the horizon"),
            (10, 200, "beyond the horizon: poller"),
        ):
            self.deal_in_background(run, delay=delay, players=players, label=label)

        self.watcher.watch_for(2 - self.elapsed())
        self.cancel(cancelled)
        self.edit(twice)
        self.watcher.watch_for(3 - self.elapsed())
        self.edit(edited)
        self.watcher.watch_for(4 - self.elapsed())
        self.edit(twice)
        self.edit(edit_then_cancel)
        self.watcher.watch_for(5 - self.elapsed())
        self.cancel(edit_then_cancel)

        self.say(f"waiting for #{welcome.operation_id} to be sent, then trying to cancel it")
        self.watcher.watch_until(
            lambda: self.finished(welcome.operation_id), timeout=finish_timeout
        )
        self.cancel(welcome)

        self.say("waiting for every operation that should run")
        expected = run.expected_to_run()
        self.watcher.watch_until(lambda: self.all_finished(expected), timeout=finish_timeout)
        # A little longer, so that a duplicate run (which must not happen) would be seen.
        self.watcher.watch_for(1.5)
        return run

    # --- Actions, through the views -----------------------------------------------------------
    def create_post(self, run: DemoRun, title: str, *, expect_email: bool = True) -> DemoPost:
        response = self.post(
            reverse("blog:post_create"), {"title": title, "body": f"{title}: the body."}
        )
        post = Post.objects.get(pk=resolve(response["Location"]).kwargs["pk"])
        operation = BatchOperation.objects.for_context_object(post).first()
        demo_post = DemoPost(title, post, operation.pk if operation else None, expect_email)
        run.posts.append(demo_post)
        self.say(f"wrote post {post.pk} {title!r}: {self.messages(response)}")
        return demo_post

    def edit(self, demo_post: DemoPost) -> None:
        demo_post.last_edit_at = timezone.now()
        response = self.post(
            reverse("blog:post_edit", args=[demo_post.post.pk]),
            {"title": demo_post.title, "body": "Better wording."},
        )
        self.say(f"edited post {demo_post.post.pk} {demo_post.title!r}: {self.messages(response)}")

    def cancel(self, demo_post: DemoPost) -> None:
        response = self.post(reverse("blog:cancel_notification", args=[demo_post.post.pk]), {})
        message = self.messages(response)
        demo_post.cancel_messages.append(message)
        self.say(f"cancel notification of post {demo_post.post.pk} {demo_post.title!r}: {message}")

    def deal_in_background(self, run: DemoRun, *, delay: float, players: int, label: str) -> None:
        game = Game.objects.create(name=f"Background deal ({label})")
        before = set(BatchOperation.objects.for_context_object(game).values_list("pk", flat=True))
        response = self.post(
            reverse("game:deal_in_background", args=[game.pk]),
            {"players": players, "delay_seconds": delay, "chunk": 50, "pause": 0.25},
        )
        self.messages(response)
        operation = BatchOperation.objects.for_context_object(game).exclude(pk__in=before).get()
        run.deals.append(DemoDeal(game, operation.pk, players, delay))
        self.say(
            f"game {game.pk}: {players} players to deal in the background in {delay:g}s "
            f"({label}), operation #{operation.pk}"
        )

    # --- Helpers ------------------------------------------------------------------------------
    def post(self, url: str, data: dict[str, Any]) -> Any:
        response = self.client.post(url, data)
        if response.status_code != 302:
            raise RuntimeError(
                f"POST {url} answered {response.status_code}: {response.content[:500]!r}"
            )
        return response

    def messages(self, response: Any) -> str:
        """The flash messages the view left; then forget them, as a page showing them would."""
        text = " ".join(str(message) for message in get_messages(response.wsgi_request))
        self.client.cookies.pop("messages", None)
        return text

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    @staticmethod
    def finished(operation_id: int | None) -> bool:
        return BatchOperation.objects.filter(
            pk=operation_id, status=BatchOperation.STATUS_FINISHED
        ).exists()

    @staticmethod
    def all_finished(ids: list[int]) -> bool:
        done = BatchOperation.objects.filter(
            pk__in=ids, status=BatchOperation.STATUS_FINISHED
        ).count()
        return done == len(ids)


def seconds_after(start: datetime, moment: datetime | None) -> str:
    if moment is None:
        return "-"
    return f"+{(moment - start) / timedelta(seconds=1):.2f}s"
