"""Game URLs."""

from django.urls import path

from . import views

app_name = "game"
urlpatterns = [
    path("", views.game_list, name="game_list"),
    path("new/", views.game_create, name="game_create"),
    path("<int:pk>/", views.game_detail, name="game_detail"),
    path("<int:pk>/deal-in-background/", views.deal_in_background, name="deal_in_background"),
]
