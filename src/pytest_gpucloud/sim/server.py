"""Run the simulated cloud under uvicorn, in a thread with an event loop of its own."""

from __future__ import annotations

import atexit
import socket
import threading
import time
from types import TracebackType

import uvicorn

from pytest_gpucloud.sim.app import create_app
from pytest_gpucloud.sim.config import SimConfig

_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 30.0


class SimServer:
    """The simulated cloud on ``config.host``: ``start()`` gives its base URL, ``stop()`` ends
    every instance and the server. Independent of the caller's event loop; a context manager.
    """

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.url: str | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        if self._thread is not None:
            raise RuntimeError("this SimServer was started already")
        sock = _bind(self.config.host, self.config.port)
        self._server = uvicorn.Server(
            uvicorn.Config(
                create_app(self.config),
                log_config=None,  # leave the host process's logging alone
                log_level="warning",
                access_log=False,
                lifespan="on",
                timeout_graceful_shutdown=2,
            )
        )
        self._thread = threading.Thread(
            target=self._server.run, args=([sock],), name="gpucloud-sim", daemon=True
        )
        self._thread.start()
        self._wait_started(self._server, self._thread)
        atexit.register(self.stop)  # instance processes live in sessions of their own
        host, port = sock.getsockname()[:2]
        self.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        return self.url

    def stop(self) -> None:
        """Terminate every live instance, then stop serving; a second call does nothing."""
        if self._server is None or self._thread is None:
            return
        atexit.unregister(self.stop)
        self._server.should_exit = True
        self._thread.join(_STOP_TIMEOUT_S)
        self._server = None

    def __enter__(self) -> SimServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @staticmethod
    def _wait_started(server: uvicorn.Server, thread: threading.Thread) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                raise RuntimeError("gpu-cloud sim: the server did not start")
            time.sleep(0.005)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only then, and
    # without it every answer waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock
