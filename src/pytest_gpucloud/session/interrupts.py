"""SIGINT and SIGTERM during a session, and atexit as a last resort.

CI cancels a job with SIGINT, then SIGTERM 7.5 s later, then SIGKILL at 10 s. Either
signal interrupts the session as Ctrl-C does (``KeyboardInterrupt``), so pytest ends it
with the interrupted status and the teardown deletes every instance at once. Once the
session is ending (the first signal, or the teardown has begun), further signals only say
that the teardown is under way: interrupting pytest's own handling of the first, or the
teardown, would leave instances behind.
"""

from __future__ import annotations

import atexit
import contextlib
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

HANDLED = (signal.SIGINT, signal.SIGTERM)
TEARING_DOWN = (
    "gpu-cloud: deleting this session's instances, please wait (a killed session leaves "
    "them to their max lifetime or to python -m pytest_gpucloud cleanup)\n"
)


class Interrupts:
    """Installed for one session by the process that owns its instances."""

    def __init__(self, teardown: Callable[[], None]) -> None:
        self._teardown = teardown
        self._previous: dict[signal.Signals, Any] = {}
        #: Set at the first signal and when the teardown begins: later signals only wait.
        self.ending = False
        #: The first signal that came, if one did.
        self.signalled: str | None = None

    def install(self) -> None:
        """Take SIGINT (unless ignored) and SIGTERM; only the main thread can."""
        atexit.register(self._teardown)
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in HANDLED:
            if signal.getsignal(signum) is signal.SIG_IGN:
                continue  # a background job's SIGINT: whoever started us asked for that
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        atexit.unregister(self._teardown)
        for signum, previous in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):  # None: set outside Python
                signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.ending:
            sys.stderr.write(TEARING_DOWN)
            return
        self.ending = True
        self.signalled = signal.Signals(signum).name
        raise KeyboardInterrupt(self.signalled)
