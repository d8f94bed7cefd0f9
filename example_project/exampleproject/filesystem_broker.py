"""The embedded broker: kombu's filesystem transport, with messages that appear atomically.

kombu's filesystem transport creates a message file and then writes it; a consumer polling the
folder can take the file in between, read it empty and stop the worker with a
``JSONDecodeError``. Here a message is written under a name no consumer looks at and then
renamed into place (atomic on POSIX file systems), so a consumer sees whole messages only.
Used only when ``CELERY_BROKER_URL`` is unset or ``filesystem://`` (see settings).
"""

from __future__ import annotations

import os
import uuid
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class Channel(filesystem.Channel):
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        """Put a message onto ``queue``: write a hidden file, then rename it to a message."""
        # The name format is kombu's: the millisecond prefix keeps messages in order.
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final_path = os.path.join(self.data_folder_out, name)
        # A leading dot: kombu's reader only takes files named "<id>.<queue>.msg".
        partial_path = os.path.join(self.data_folder_out, f".partial-{name}")
        try:
            with open(partial_path, "wb") as partial:
                partial.write(str_to_bytes(dumps(payload)))
            os.replace(partial_path, final_path)
        except OSError as exc:
            raise ChannelError(f"Cannot add file {final_path!r} to directory") from exc


class Transport(filesystem.Transport):
    Channel = Channel
