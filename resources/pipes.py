"""Pipes message readers that hand each custom message (a logged training step) to a callback as it arrives."""

from contextlib import contextmanager

import dagster as dg


class StreamingMessageReader(dg.PipesTempFileMessageReader):
    """Hands each Pipes custom message to `on_message` as it arrives (the stock handler only keeps a list)."""

    def __init__(self, on_message):
        super().__init__()
        self.on_message = on_message

    @contextmanager
    def read_messages(self, handler):
        with super().read_messages(Tap(handler, self.on_message)) as params:
            yield params


class Tap:
    def __init__(self, handler, on_message):
        self._handler, self._on_message = handler, on_message

    def __getattr__(self, name):
        return getattr(self._handler, name)

    def handle_message(self, message) -> None:
        self._handler.handle_message(message)
        if message.get("method") == "report_custom_message":
            self._on_message(message["params"]["payload"])
