"""Status lines of the fleet's instances, from the engine thread to pytest's main thread.

The fleet puts an :class:`Event` when an instance moves (requested, booting, ready, busy,
released, failed); the controller drains the queue on the main thread, between tests and at
the session's end, and writes one line per event.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    label: str
    state: str
    detail: str = ""

    def line(self) -> str:
        detail = f" {self.detail}" if self.detail else ""
        return f"gpu-cloud: {self.label} {self.state}{detail}"


class Progress:
    """A thread-safe queue of :class:`Event`."""

    def __init__(self) -> None:
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()

    def emit(self, label: str, state: str, detail: str = "") -> None:
        self._events.put(Event(label, state, detail))

    def drain(self) -> list[Event]:
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events
