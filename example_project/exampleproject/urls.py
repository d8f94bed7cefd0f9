"""URL map: the blog at ``/``, games, the operations pages, sign-in and the admin."""

from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="blog:post_list", permanent=False)),
    path("blog/", include("blog.urls")),
    path("games/", include("game.urls")),
    path("operations/", include("operations.urls")),
    path("accounts/", include("django.contrib.auth.urls")),
    path("admin/", admin.site.urls),
]
