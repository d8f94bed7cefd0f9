"""The operations pages: users see their own operations, staff see all, everyone else 404s."""

from blog.services import create_post
from django.contrib.auth import get_user_model
from django.test import TestCase, override_settings
from django.urls import reverse

from batchframework import BatchOperation
from batchframework.testing import run_due


@override_settings(
    BATCHFRAMEWORK={"DISPATCHER": "batchframework.dispatch.NullDispatcher"},
    BLOG_NOTIFICATION_DELAY=0,
)
class OperationViewsTests(TestCase):
    @classmethod
    def setUpTestData(cls):
        users = get_user_model().objects
        cls.owner = users.create_user("owner", "owner@example.com")
        cls.other = users.create_user("other", "other@example.com")
        cls.staff = users.create_user("staff", "staff@example.com", is_staff=True)
        _, cls.operation = create_post(cls.owner, "Mine", "Body")
        _, cls.others_operation = create_post(cls.other, "Theirs", "Body")

    def url(self, pk):
        return reverse("operations:detail", args=[pk])

    def test_login_required(self):
        self.assertEqual(self.client.get(self.url(self.operation.pk)).status_code, 302)
        self.assertEqual(self.client.get(reverse("operations:list")).status_code, 302)

    def test_owner_gets_the_json_with_output(self):
        run_due()
        self.client.force_login(self.owner)
        data = self.client.get(self.url(self.operation.pk)).json()
        self.assertEqual(data["id"], self.operation.pk)
        self.assertEqual(data["operationtype"], "new-blogpost-email")
        self.assertEqual((data["status"], data["result"]), ("finished", "successful"))
        self.assertIn("run_after", data)
        for key in ("progress_done", "progress_total", "progress_message"):
            self.assertIn(key, data)
        self.assertEqual(
            data["output_data"], {"sent_to": ["other@example.com", "staff@example.com"]}
        )

    def test_another_users_operation_is_404_not_403(self):
        self.client.force_login(self.owner)
        self.assertEqual(self.client.get(self.url(self.others_operation.pk)).status_code, 404)
        self.assertEqual(self.client.get(self.url(10**9)).status_code, 404)

    def test_malformed_ids_are_404(self):
        self.client.force_login(self.owner)
        for bad in ("abc", "-1", "1.5", "1e3", "9" * 30, "%20"):
            self.assertEqual(self.client.get(f"/operations/{bad}/").status_code, 404, bad)

    def test_staff_see_all_but_not_others_output(self):
        self.client.force_login(self.staff)
        data = self.client.get(self.url(self.others_operation.pk)).json()
        self.assertEqual(data["id"], self.others_operation.pk)
        self.assertNotIn("output_data", data)
        page = self.client.get(reverse("operations:list"))
        self.assertEqual(set(page.context["operations"]), set(BatchOperation.objects.all()))

    def test_list_shows_only_own_operations(self):
        self.client.force_login(self.owner)
        page = self.client.get(reverse("operations:list"))
        self.assertEqual(list(page.context["operations"]), [self.operation])
        self.assertContains(page, "new-blogpost-email")
