"""The background event loop that runs all network I/O, and the blocking bridge into it.

pytest's hooks run on the main thread; they call :meth:`Engine.run` which schedules a
coroutine on the engine's loop and waits for its result. Terminal writes and pytest hook
calls stay on the main thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class Engine:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="gpucloud-engine", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(
        self,
        coro: Coroutine[Any, Any, T],
        timeout: float | None = None,
        *,
        while_waiting: Callable[[], None] | None = None,
    ) -> T:
        """Run ``coro`` on the engine's loop and wait for its result (or raise its error).

        On timeout the coroutine is cancelled and ``TimeoutError`` is raised.
        ``while_waiting`` is called on this thread every ``WAIT_TICK`` seconds until then
        (to show status lines as they happen).
        """
        future = self.submit(coro)
        try:
            return _wait(future, timeout, while_waiting)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"timed out after {timeout:g} s") from None
        except BaseException:
            future.cancel()
            raise

    def close(self) -> None:
        if self.loop.is_closed() or not self._thread.is_alive():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


WAIT_TICK = 0.1


def _wait(
    future: concurrent.futures.Future[T],
    timeout: float | None,
    while_waiting: Callable[[], None] | None,
) -> T:
    if while_waiting is None:
        return future.result(timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        tick = WAIT_TICK if deadline is None else min(WAIT_TICK, deadline - time.monotonic())
        try:
            return future.result(max(tick, 0.0))
        except concurrent.futures.TimeoutError:
            if deadline is not None and time.monotonic() >= deadline:
                raise
        while_waiting()
