"""Fixtures of the test suite: a real simulated cloud on 127.0.0.1, and pytest sessions
(``pytester``) that use it through the ``rest`` provider."""

from __future__ import annotations

import logging
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_gpucloud.sim import SimConfig, SimServer
from tests import engines
from tests.cloud import BOOT_DELAY, STANDINS, GpuRun, Moto, RequestLog, Sim, Standins, Store
from tests.engines import Engine

#: The inner sessions of the suite run without what would change them unasked: the test
#: order of pytest-randomly and pytest-asyncio's warning about an unset loop scope (both
#: are installed for tests/test_e2e_plugins.py, which sets what it tests itself).
INNER_ADDOPTS = "-p no:randomly -o asyncio_default_fixture_loop_scope=function"


@pytest.fixture(autouse=True)
def _plain_inner_sessions(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if "pytester" in request.fixturenames:
        request.getfixturevalue("pytester")  # which clears PYTEST_ADDOPTS when it starts
        monkeypatch.setenv("PYTEST_ADDOPTS", INNER_ADDOPTS)


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


@pytest.fixture
def gpu_run(pytester: pytest.Pytester, sim: Sim, monkeypatch: pytest.MonkeyPatch) -> GpuRun:
    return GpuRun(pytester, sim, monkeypatch)


@pytest.fixture
def standins(tmp_path: Path, sim: Sim) -> Iterator[Standins]:
    path = tmp_path / "standin-bin"
    path.mkdir()
    for tool in ("docker", "podman", "apptainer"):
        shutil.copy2(STANDINS / "container_cli", path / tool)
    sim.configure(extra_path=str(path))
    yield Standins(path)
    sim.configure(extra_path=None)


@pytest.fixture(scope="session")
def moto() -> Iterator[Moto]:
    requests = RequestLog()
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


@pytest.fixture(scope="session")
def podman_engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Engine:
    """The real podman engine, set up by the project's own script (tests/engines.py)."""
    return engines.podman(tmp_path_factory.mktemp("podman-cli"), request.session)
