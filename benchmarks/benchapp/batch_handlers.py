"""The benchmark's handlers, discovered like a user's ``batch_handlers`` module.

Neither touches the database itself: what is measured is the framework's own cost.
"""

import time

from batchframework import handler


@handler("bench-noop")
def noop(operation):
    return None


@handler("bench-stamp")
def stamp(operation):
    """Records when the handler started (wall clock, seconds) in ``output_data``, which the
    finish writes anyway: no extra statement."""
    return {"started": time.time()}
