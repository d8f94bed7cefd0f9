"""The blog's views through Django's test client: create schedules the email, edit postpones
it, cancel prevents it, and the handler sends it once when due (time travel with run_due)."""

from datetime import timedelta

from django.contrib.auth import get_user_model
from django.core import mail
from django.test import TestCase, override_settings
from django.urls import reverse
from django.utils import timezone

from batchframework import BatchOperation
from batchframework.testing import run_due

from .models import Post

NO_DISPATCH = {"DISPATCHER": "batchframework.dispatch.NullDispatcher"}


@override_settings(BATCHFRAMEWORK=NO_DISPATCH, BLOG_NOTIFICATION_DELAY=900)
class BlogNotificationTests(TestCase):
    @classmethod
    def setUpTestData(cls):
        users = get_user_model().objects
        cls.author = users.create_user("author", "author@example.com", "pw")
        cls.reader = users.create_user("reader", "reader@example.com", "pw")

    def setUp(self):
        self.client.force_login(self.author)

    def create_post(self, title="Hello"):
        response = self.client.post(reverse("blog:post_create"), {"title": title, "body": "Body"})
        self.assertEqual(response.status_code, 302)
        return Post.objects.get(title=title)

    def notification(self, post):
        return BatchOperation.objects.for_context_object(post).get()

    def test_creating_a_post_schedules_the_email_after_the_delay(self):
        before = timezone.now()
        post = self.create_post()
        operation = self.notification(post)
        self.assertEqual(operation.operationtype, "new-blogpost-email")
        self.assertEqual(operation.started_by, self.author)
        self.assertGreaterEqual(operation.run_after, before + timedelta(seconds=900))
        self.assertEqual(run_due(), [])  # not early
        self.assertEqual(mail.outbox, [])

    def test_the_email_is_sent_once_when_due(self):
        post = self.create_post()
        later = timezone.now() + timedelta(minutes=16)
        ran = run_due(now=later)
        self.assertEqual(len(ran), 1)
        self.assertEqual(len(mail.outbox), 1)
        self.assertEqual(mail.outbox[0].to, [])
        self.assertEqual(mail.outbox[0].bcc, ["reader@example.com"])
        self.assertIn(f"[post #{post.pk}]", mail.outbox[0].subject)
        self.assertEqual(self.notification(post).output_data, {"sent_to": ["reader@example.com"]})
        self.assertEqual(run_due(now=later), [])
        self.assertEqual(len(mail.outbox), 1)

    def test_no_reader_sees_another_readers_address(self):
        get_user_model().objects.create_user("second", "second@example.com", "pw")
        self.create_post()
        run_due(now=timezone.now() + timedelta(minutes=16))
        [message] = mail.outbox
        self.assertEqual(sorted(message.bcc), ["reader@example.com", "second@example.com"])
        headers = message.message().as_string().split("\n\n", 1)[0]
        self.assertNotIn("reader@example.com", headers)
        self.assertNotIn("second@example.com", headers)

    def test_a_title_with_a_line_break_still_gets_its_email(self):
        """A crafted POST can put a line break in the title; the subject is one line."""
        post = self.create_post(title="Two\r\nlines")
        run_due(now=timezone.now() + timedelta(minutes=16))
        self.assertEqual(self.notification(post).result, BatchOperation.RESULT_SUCCESSFUL)
        self.assertEqual(mail.outbox[0].subject, f"New blog post: Two lines [post #{post.pk}]")

    def test_editing_postpones_the_pending_email(self):
        post = self.create_post()
        first_due = self.notification(post).run_after
        response = self.client.post(
            reverse("blog:post_edit", args=[post.pk]), {"title": "Hello", "body": "New"}
        )
        self.assertEqual(response.status_code, 302)
        self.assertGreater(self.notification(post).run_after, first_due)
        self.assertEqual(BatchOperation.objects.for_context_object(post).count(), 1)

    def test_editing_after_the_email_went_sends_nothing_new(self):
        post = self.create_post()
        run_due(now=timezone.now() + timedelta(minutes=16))
        self.client.post(
            reverse("blog:post_edit", args=[post.pk]), {"title": "Hello", "body": "New"}
        )
        self.assertEqual(BatchOperation.objects.for_context_object(post).unprocessed().count(), 0)

    def test_cancel_notification_prevents_the_email(self):
        post = self.create_post()
        response = self.client.post(
            reverse("blog:cancel_notification", args=[post.pk]), follow=True
        )
        self.assertContains(response, "will not be sent")
        self.assertFalse(BatchOperation.objects.for_context_object(post).exists())
        self.assertEqual(run_due(now=timezone.now() + timedelta(hours=1)), [])
        self.assertEqual(mail.outbox, [])

    def test_cancel_after_sending_is_refused(self):
        post = self.create_post()
        run_due(now=timezone.now() + timedelta(minutes=16))
        response = self.client.post(
            reverse("blog:cancel_notification", args=[post.pk]), follow=True
        )
        self.assertContains(response, "no pending notification")
        self.assertEqual(len(mail.outbox), 1)

    def test_only_the_author_may_edit_or_cancel(self):
        post = self.create_post()
        self.client.force_login(self.reader)
        self.assertEqual(
            self.client.post(reverse("blog:cancel_notification", args=[post.pk])).status_code, 404
        )
        self.assertEqual(
            self.client.get(reverse("blog:post_edit", args=[post.pk])).status_code, 404
        )
        self.assertTrue(BatchOperation.objects.for_context_object(post).exists())

    def test_pages_render(self):
        post = self.create_post()
        self.assertContains(self.client.get(reverse("blog:post_list")), "Hello")
        self.assertContains(self.client.get(post.get_absolute_url()), "Cancel notification")
