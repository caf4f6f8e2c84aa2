"""Fixtures of the test suite: a real simulated cloud on 127.0.0.1, and pytest sessions
(``pytester``) that use it through the ``rest`` provider."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pytest_gpucloud.api_models import LIVE_STATUSES
from pytest_gpucloud.sim import SimConfig, SimServer

BOOT_DELAY = 0.05


class Sim:
    """A running simulated cloud and its admin API (records, faults, settings)."""

    def __init__(self, url: str, api_key: str) -> None:
        self.url = url
        self.api_key = api_key
        self._http = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=10
        )

    def instances(self) -> list[dict[str, Any]]:
        response = self._http.get("/_sim/instances")
        response.raise_for_status()
        result: list[dict[str, Any]] = response.json()
        return result

    def live(self) -> list[dict[str, Any]]:
        return [i for i in self.instances() if i["status"] in LIVE_STATUSES]

    def fault(self, **rule: Any) -> None:
        self._http.post("/_sim/faults", json={"faults": [rule]}).raise_for_status()

    def configure(self, **settings: Any) -> None:
        self._http.put("/_sim/config", json=settings).raise_for_status()

    def reset(self) -> None:
        self._http.delete("/_sim/faults").raise_for_status()
        self.configure(boot_delay_s=BOOT_DELAY)

    def close(self) -> None:
        self._http.close()


@pytest.fixture(scope="session")
def sim_server() -> Iterator[Sim]:
    api_key = secrets.token_urlsafe(16)
    server = SimServer(SimConfig(api_key=api_key, boot_delay_s=BOOT_DELAY))
    url = server.start()
    sim = Sim(url, api_key)
    yield sim
    sim.close()
    server.stop()


@pytest.fixture
def sim(sim_server: Sim) -> Iterator[Sim]:
    """The shared simulated cloud, reset; the test fails if it leaves an instance alive."""
    sim_server.reset()
    known = {i["id"] for i in sim_server.instances()}
    yield sim_server
    leaked = [i["id"] for i in sim_server.live() if i["id"] not in known]
    sim_server.reset()
    assert not leaked, f"instances left alive: {leaked}"


class GpuRun:
    """Runs pytest sessions of a pytester project against the simulated cloud."""

    def __init__(
        self, pytester: pytest.Pytester, sim: Sim, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        self.pytester = pytester
        self.sim = sim
        monkeypatch.setenv("GPUCLOUD_API_KEY", sim.api_key)
        monkeypatch.delenv("GPUCLOUD_PROVIDER", raising=False)

    def args(self) -> list[str]:
        return ["--gpu-cloud", "--gpu-provider", "rest", "--gpu-api-url", self.sim.url]

    def __call__(self, *args: str) -> pytest.RunResult:
        return self.pytester.runpytest_inprocess(*self.args(), *args)

    def subprocess(self, *args: str, timeout: float = 120) -> pytest.RunResult:
        return self.pytester.runpytest_subprocess(*self.args(), *args, timeout=timeout)


@pytest.fixture
def gpu_run(pytester: pytest.Pytester, sim: Sim, monkeypatch: pytest.MonkeyPatch) -> GpuRun:
    return GpuRun(pytester, sim, monkeypatch)
