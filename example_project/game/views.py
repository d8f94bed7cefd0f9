"""Game views: start a game with a synchronous bulk deal (showing its query count), or add
players in the background as an operation with progress."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from batchframework import enqueue

from .batch_handlers import DEAL_IN_BACKGROUND
from .forms import BackgroundDealForm, NewGameForm
from .models import Game
from .services import measure_deal


def game_list(request: HttpRequest) -> HttpResponse:
    return render(
        request, "game/game_list.html", {"games": Game.objects.all(), "form": NewGameForm()}
    )


@login_required
def game_create(request: HttpRequest) -> HttpResponse:
    form = NewGameForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        game = Game.objects.create(name=form.cleaned_data["name"])
        deal = measure_deal(game, form.cleaned_data["players"])
        deal.operation.started_by = request.user
        deal.operation.save(update_fields=["started_by"])
        messages.info(
            request,
            f"Dealt {form.cleaned_data['players']} players one card each in {deal.queries} "
            f"queries ({', '.join(deal.statements)}), as operation #{deal.operation.pk}.",
        )
        return redirect(game)
    return render(request, "game/game_list.html", {"games": Game.objects.all(), "form": form})


def game_detail(request: HttpRequest, pk: int) -> HttpResponse:
    return _detail(request, get_object_or_404(Game, pk=pk), BackgroundDealForm())


def _detail(
    request: HttpRequest, game: Game, form: BackgroundDealForm, status: int = 200
) -> HttpResponse:
    context = {"game": game, "player_count": game.players.count(), "form": form}
    return render(request, "game/game_detail.html", context, status=status)


@login_required
@require_POST
def deal_in_background(request: HttpRequest, pk: int) -> HttpResponse:
    game = get_object_or_404(Game, pk=pk)
    form = BackgroundDealForm(request.POST)
    if not form.is_valid():
        return _detail(request, game, form, status=400)
    data = form.cleaned_data
    operation = enqueue(
        DEAL_IN_BACKGROUND,
        context_object=game,
        input_data={
            "players": data["players"],
            "chunk": data["chunk"],
            "pause": data["pause"] or 0,
        },
        delay=data["delay_seconds"],
        started_by=request.user,
    )
    messages.info(request, f"Operation #{operation.pk} deals the cards in the background.")
    return redirect("operations:list")
