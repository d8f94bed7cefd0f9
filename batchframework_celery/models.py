"""The poller's one piece of state, kept in the database like everything else."""

from __future__ import annotations

from django.db import models


class PollerWatermark(models.Model):
    """How far ahead the poller has published operations that had no message yet.

    Each tick publishes the operations coming due between this mark and a little more than
    one poll interval ahead, then moves the mark. A late tick (a busy worker, a slow beat)
    therefore leaves no gap between its window and the previous one, and two pollers at once
    (row lock) publish nothing twice.
    """

    name = models.CharField(max_length=100, primary_key=True)
    published_until = models.DateTimeField()

    class Meta:
        verbose_name = "poller watermark"

    def __str__(self) -> str:
        return f"{self.name}: published until {self.published_until.isoformat()}"
