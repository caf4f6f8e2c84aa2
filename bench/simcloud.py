"""The simulated cloud in a process of its own, as a real cloud would be: its SSH servers
and the instances' processes do not share the measured process's CPU time or memory.

:class:`SimProcess` runs ``python -m pytest_gpucloud.sim --port 0`` and gives its URL and
API key; :func:`instance` creates one instance through the ``rest`` provider, connects to
it with the plugin's own SSH transport, and deletes it afterwards.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from pytest_gpucloud.core.catalog import Offer
from pytest_gpucloud.providers.rest import RestProvider
from pytest_gpucloud.transport import ssh

if TYPE_CHECKING:
    import asyncssh

    from pytest_gpucloud.providers.base import Instance

_URL = re.compile(rb"on (http://\S+)")
# A RAM-backed folder for files the benchmarks write, where this machine has one.
TMPFS = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


class SimProcess:
    """``python -m pytest_gpucloud.sim`` on a free port of 127.0.0.1, no boot delay."""

    def __init__(self, tmpdir: str | None = None) -> None:
        self.api_key = secrets.token_urlsafe(16)
        self.tmpdir = tmpdir  # where its instances' home folders go (default: the system's)
        self.url = ""
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SimProcess:
        self._proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "pytest_gpucloud.sim"),
                *("--port", "0", "--boot-delay", "0", f"--api-key={self.api_key}"),
            ],
            stdout=subprocess.PIPE,
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith("GPUCLOUD_")},
                **({"TMPDIR": self.tmpdir} if self.tmpdir else {}),
            },
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        found = _URL.search(line)
        if found is None:
            self.stop()
            raise RuntimeError(f"the sim did not start: {line!r}")
        self.url = found.group(1).decode()
        return self

    def env(self) -> dict[str, str]:
        """The environment of a pytest process that uses this sim via ``--gpu-provider rest``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUCLOUD_")}
        return {**env, "GPUCLOUD_API_KEY": self.api_key, "GPUCLOUD_API_URL": self.url}

    def cpu_seconds(self) -> float:
        """CPU time of the sim and of the instance processes it has waited for."""
        assert self._proc is not None
        fields = Path(f"/proc/{self._proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
        return ticks / os.sysconf("SC_CLK_TCK")

    def provider(self) -> RestProvider:
        return RestProvider(self.url, self.api_key)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> SimProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextlib.asynccontextmanager
async def instance(
    provider: RestProvider, key: asyncssh.SSHKey
) -> AsyncIterator[tuple[Instance, float]]:
    """A running T4 instance of the sim and the second its SSH endpoint was announced."""
    catalog = await provider.catalog()
    gpu = next(g for g in catalog if g.name == "T4")
    offer = Offer(gpu, gpu.regions[0])
    created = await provider.create(
        offer,
        count=1,
        image="bench",
        ssh_public_key=ssh.public_key_line(key),
        labels={"gpucloud-bench": "1"},
        max_lifetime_s=3600,
        client_token=uuid.uuid4().hex,
    )
    try:
        ready = await provider.wait_ready(created, 60)
        yield ready, time.perf_counter()
    finally:
        await provider.delete(created.id)
