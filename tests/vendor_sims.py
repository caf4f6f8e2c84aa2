"""A simulated cloud per vendor dialect, and pytest sessions that use it through the vendor's
provider (``--gpu-provider lambda|runpod|lyceum --gpu-api-url <the dialect's base URL>``)."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pytest_gpucloud.core.environment import VENDOR_KEY_ENV
from pytest_gpucloud.core.sshlib import asyncssh
from pytest_gpucloud.sim import SimConfig, SimServer
from pytest_gpucloud.sim.config import Dialect
from tests.cloud import BOOT_DELAY, Sim

BASE_PATH = {"lambda": "/api/v1", "runpod": "/v2", "lyceum": "/api/v2/external"}


# A public key to hand the dialects' create calls (its machines take any).
KEY = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
# One gpu test, on the type every dialect offers.
GPU_TEST = """
import os, pytest

@pytest.mark.gpu("H100")
def test_on_h100():
    assert os.environ["GPUCLOUD_SIM_GPU"] == "H100:1"
"""


class VendorSim(Sim):
    """A dialect's simulated cloud: the admin API of :class:`Sim`, and the vendor's API."""

    def __init__(self, dialect: str, url: str, api_key: str) -> None:
        super().__init__(url, api_key)
        self.dialect = dialect
        self.base_url = url + BASE_PATH[dialect]
        self.api = httpx.Client(
            base_url=self.base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=10
        )

    def wait_gone(self, timeout: float = 30.0, keep: frozenset[str] = frozenset()) -> None:
        """Wait until no instance but those in ``keep`` is alive (a delete takes a moment to
        end one, longer on a loaded machine)."""
        deadline = time.monotonic() + timeout
        while {i["id"] for i in self.live()} - keep:
            assert time.monotonic() < deadline, f"instances left alive: {self.live()}"
            time.sleep(0.05)

    def calls(self, method: str, path_end: str) -> list[dict[str, Any]]:
        """The requests answered so far whose method is ``method`` and path ends so."""
        return [
            r for r in self.requests() if r["method"] == method and r["path"].endswith(path_end)
        ]


def start(dialect: Dialect) -> Iterator[VendorSim]:
    """A fixture's body: the dialect's simulated cloud, stopped after the test."""
    api_key = secrets.token_urlsafe(16)
    server = SimServer(SimConfig(api_key=api_key, boot_delay_s=BOOT_DELAY, dialect=dialect))
    sim = VendorSim(dialect, server.start(), api_key)
    yield sim
    try:
        sim.wait_gone()  # the test fails if it leaves an instance alive
    finally:
        sim.api.close()
        sim.close()
        server.stop()


class VendorRun:
    """Runs pytest sessions of a pytester project against a dialect's simulated cloud."""

    def __init__(self, pytester: pytest.Pytester, sim: VendorSim, mp: pytest.MonkeyPatch) -> None:
        self.pytester = pytester
        self.sim = sim
        for name in ("GPUCLOUD_API_KEY", "GPUCLOUD_PROVIDER", "GPUCLOUD_API_URL"):
            mp.delenv(name, raising=False)
        mp.setenv(VENDOR_KEY_ENV[sim.dialect], sim.api_key)

    def args(self) -> list[str]:
        return [
            "--gpu-cloud",
            "--gpu-provider",
            self.sim.dialect,
            "--gpu-api-url",
            self.sim.base_url,
        ]

    def __call__(self, *args: str) -> pytest.RunResult:
        return self.pytester.runpytest_inprocess(*self.args(), *args)
