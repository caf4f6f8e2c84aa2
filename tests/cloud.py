"""The suite's handles on the simulated cloud and on pytest sessions that use it; the
fixtures that make them are in conftest.py."""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncssh
import httpx
import pytest

from pytest_gpucloud.core.wire import LIVE_STATUSES

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

BOOT_DELAY = 0.05
STANDINS = Path(__file__).parent / "standins"


def standin_gpus(*names: str) -> str:
    """STANDIN_NVIDIA_GPUS for GPUs of these names, with uuids of their own."""
    token = secrets.token_hex(4)
    return ";".join(f"GPU-{token}-{i}|{name}|15360" for i, name in enumerate(names))


@dataclass(frozen=True)
class SimHost:
    """A sim instance serving as a static host of the ``ssh`` provider."""

    id: str
    gpu: str
    port: int
    host_key: str
    home: Path


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

    def static_host(self, gpu: str, key: asyncssh.SSHKey) -> SimHost:
        """A sim instance created through the API, to serve as a static host."""
        created = self._http.post(
            "/v1/instances",
            json={
                "gpu_type": gpu,
                "image": "static",
                "ssh_public_key": key.export_public_key().decode(),
                "max_lifetime_s": 3600,
                "client_token": secrets.token_hex(8),
            },
        ).json()
        deadline = time.monotonic() + 30
        while (answer := self._http.get(f"/v1/instances/{created['id']}").json())[
            "status"
        ] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        home = next(i["home"] for i in self.instances() if i["id"] == created["id"])
        return SimHost(created["id"], gpu, answer["ssh_port"], answer["ssh_host_key"], Path(home))

    def live(self) -> list[dict[str, Any]]:
        return [i for i in self.instances() if i["status"] in LIVE_STATUSES]

    def fault(self, **rule: Any) -> None:
        self._http.post("/_sim/faults", json={"faults": [rule]}).raise_for_status()

    def configure(self, **settings: Any) -> None:
        self._http.put("/_sim/config", json=settings).raise_for_status()

    def requests(self) -> list[dict[str, Any]]:
        """The ``/v1`` requests answered so far, oldest first (``SimRequestRecord``)."""
        response = self._http.get("/_sim/requests")
        response.raise_for_status()
        result: list[dict[str, Any]] = response.json()
        return result

    def delete(self, instance_id: str) -> None:
        """Delete an instance through the API, as a user would, and wait until it is gone."""
        self._http.delete(f"/v1/instances/{instance_id}")
        deadline = time.monotonic() + 30
        while any(i["id"] == instance_id for i in self.live()):
            assert time.monotonic() < deadline, f"{instance_id} outlived its delete"
            time.sleep(0.02)

    def reset(self) -> None:
        self._http.delete("/_sim/faults").raise_for_status()
        self.configure(boot_delay_s=BOOT_DELAY, lifetime_scale=1.0, lifetime_check_interval_s=1.0)

    def close(self) -> None:
        self._http.close()


class GpuRun:
    """Runs pytest sessions of a pytester project against the simulated cloud."""

    def __init__(
        self, pytester: pytest.Pytester, sim: Sim, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        self.pytester = pytester
        self.sim = sim
        monkeypatch.setenv("GPUCLOUD_API_KEY", sim.api_key)
        monkeypatch.delenv("GPUCLOUD_PROVIDER", raising=False)
        # Sessions under test write no job summary or annotations for the CI running them.
        for name in ("GITHUB_STEP_SUMMARY", "GITHUB_ACTIONS"):
            monkeypatch.delenv(name, raising=False)

    def args(self) -> list[str]:
        return ["--gpu-cloud", "--gpu-provider", "rest", "--gpu-api-url", self.sim.url]

    def __call__(self, *args: str) -> pytest.RunResult:
        return self.pytester.runpytest_inprocess(*self.args(), *args)

    def subprocess(self, *args: str, timeout: float = 120) -> pytest.RunResult:
        return self.pytester.runpytest_subprocess(*self.args(), *args, timeout=timeout)


class Standins:
    """Recording stand-ins of the docker, podman and apptainer CLIs (tests/standins) in a
    folder of their own, first on the PATH of sim instances created meanwhile."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def calls(self, tool: str | None = None) -> list[dict[str, Any]]:
        """Every call so far (``tool``, ``argv``, ``cwd``, ``env`` names...), oldest first."""
        log = self.path / "calls.jsonl"
        if not log.exists():
            return []
        calls = [json.loads(line) for line in log.read_text().splitlines()]
        return [c for c in calls if tool is None or c["tool"] == tool]


class RequestLog(logging.Handler):
    """The request lines moto's HTTP server logs."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@dataclass
class Moto:
    endpoint: str
    requests: RequestLog


@dataclass
class Store:
    """A fresh bucket, and the credentials this test's pytest sessions use."""

    endpoint: str
    bucket: str
    client: S3Client
    requests: RequestLog
    secrets: list[str] = field(default_factory=list)

    def put(self, key: str, body: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=body)

    def keys(self) -> dict[str, bytes]:
        listed = self.client.list_objects_v2(Bucket=self.bucket).get("Contents", [])
        return {
            obj["Key"]: self.client.get_object(Bucket=self.bucket, Key=obj["Key"])["Body"].read()
            for obj in listed
        }

    def gets(self, key: str) -> int:
        """How many GETs of ``key`` the store has served."""
        return sum(1 for line in self.requests.lines if f'"GET /{self.bucket}/{key}?' in line)
