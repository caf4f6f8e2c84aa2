"""Fixtures of the test suite: a real simulated cloud on 127.0.0.1, and pytest sessions
(``pytester``) that use it through the ``rest`` provider."""

from __future__ import annotations

import json
import logging
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from pytest_gpucloud.api_models import LIVE_STATUSES
from pytest_gpucloud.sim import SimConfig, SimServer

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

BOOT_DELAY = 0.05
STANDINS = Path(__file__).parent / "standins"


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


@pytest.fixture
def standins(tmp_path: Path, sim: Sim) -> Iterator[Standins]:
    path = tmp_path / "standin-bin"
    path.mkdir()
    for tool in ("docker", "podman", "apptainer"):
        shutil.copy2(STANDINS / "container_cli", path / tool)
    sim.configure(extra_path=str(path))
    yield Standins(path)
    sim.configure(extra_path=None)


# -- S3: a real S3 API on 127.0.0.1 (moto's server mode) -------------------------------------


class _Requests(logging.Handler):
    """The request lines moto's HTTP server logs."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@dataclass
class Moto:
    endpoint: str
    requests: _Requests


@pytest.fixture(scope="session")
def moto() -> Iterator[Moto]:
    requests = _Requests()
    log = logging.getLogger("werkzeug")
    log.addHandler(requests)  # also keeps werkzeug from adding its own stderr handler
    log.setLevel(logging.INFO)
    log.propagate = False
    from moto.server import ThreadedMotoServer  # here: most sessions of the suite need no S3

    server = ThreadedMotoServer("127.0.0.1", 0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield Moto(f"http://{host}:{port}", requests)
    server.stop()
    log.removeHandler(requests)


@dataclass
class Store:
    """A fresh bucket, and the credentials this test's pytest sessions use."""

    endpoint: str
    bucket: str
    client: S3Client
    requests: _Requests
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


@pytest.fixture
def store(moto: Moto, monkeypatch: pytest.MonkeyPatch) -> Store:
    key_id = "AKIA" + secrets.token_hex(8).upper()
    secret = secrets.token_urlsafe(30)
    for name, value in {
        "AWS_ACCESS_KEY_ID": key_id,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    import boto3

    client = boto3.client("s3", endpoint_url=moto.endpoint)
    bucket = f"bucket-{secrets.token_hex(4)}"
    client.create_bucket(Bucket=bucket)
    return Store(moto.endpoint, bucket, client, moto.requests, [key_id, secret])
