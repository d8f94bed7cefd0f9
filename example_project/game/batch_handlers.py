"""The game's background handler: the same bulk deal, in chunks, reporting durable progress."""

from __future__ import annotations

import random
import time
from typing import Any

from batchframework import BatchOperation, handler

from .services import add_players_with_cards

DEAL_IN_BACKGROUND = "deal-cards"


@handler(DEAL_IN_BACKGROUND)
def deal_cards_in_background(operation: BatchOperation) -> dict[str, Any]:
    """Add ``players`` players in chunks of ``chunk``, recording progress after each chunk.

    ``pause`` (seconds between chunks, default 0) exists for the demo, so that progress is
    visible to a human watching it.
    """
    options = operation.input_data or {}
    total = int(options.get("players", 100))
    chunk = max(1, int(options.get("chunk", 50)))
    pause = float(options.get("pause", 0))
    game = operation.context_object
    rng = random.Random(operation.pk)
    operation.set_progress(0, total, "shuffling")
    done = 0
    while done < total:
        names = [
            f"bg{operation.pk}-player{index}" for index in range(done, min(total, done + chunk))
        ]
        done += add_players_with_cards(game, operation, names, rng)
        operation.set_progress(done, total, f"dealt {done}/{total} players")
        if pause and done < total:
            time.sleep(pause)
    return {"players": done, "cards": done}
