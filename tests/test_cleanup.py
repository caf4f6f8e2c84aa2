"""``python -m pytest_gpucloud cleanup``: the project's stale instances, found by their labels.

Instances are made here through the API as a session that died would have left them. The
SIGKILLed session itself is in test_faults.py.
"""

from __future__ import annotations

import io
import secrets
import time
from collections.abc import Iterator
from importlib import metadata

import asyncssh
import httpx
import pytest

from pytest_gpucloud.__main__ import main as package_main
from pytest_gpucloud.cli import cleanup
from pytest_gpucloud.core.labels import EXPIRES, OWNER, PROJECT, SESSION, project_label
from tests.cloud import Sim

KEY = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()


class Cloud:
    """Instances made through the API, as a killed session leaves them."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self._http = httpx.Client(
            base_url=sim.url, headers={"Authorization": f"Bearer {sim.api_key}"}, timeout=10
        )
        self.made: list[str] = []

    def leave(self, project: str, *, expires_in: float, session: str = "0123456789ab") -> str:
        labels = {
            SESSION: session,
            PROJECT: project,
            OWNER: "someone",
            EXPIRES: str(int(time.time() + expires_in)),
        }
        body = {
            "gpu_type": "T4",
            "image": "python:3.12-slim",
            "ssh_public_key": KEY,
            "labels": labels,
            "max_lifetime_s": 3600,
            "client_token": secrets.token_hex(8),
        }
        response = self._http.post("/v1/instances", json=body)
        response.raise_for_status()
        instance_id: str = response.json()["id"]
        self.made.append(instance_id)
        return instance_id

    def alive(self) -> set[str]:
        return {i["id"] for i in self.sim.live()} & set(self.made)

    def close(self) -> None:
        for instance_id in self.alive():
            self.sim.delete(instance_id)
        self._http.close()


@pytest.fixture
def cloud(sim: Sim, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cloud]:
    monkeypatch.setenv("GPUCLOUD_API_KEY", sim.api_key)
    for name in ("GPUCLOUD_PROVIDER", "GPUCLOUD_API_URL"):
        monkeypatch.delenv(name, raising=False)
    made = Cloud(sim)
    yield made
    made.close()


def test_deletes_only_this_projects_instances_past_their_expiry(
    cloud: Cloud, pytester: pytest.Pytester, capsys: pytest.CaptureFixture[str], sim: Sim
) -> None:
    pytester.makeini(f"[pytest]\ngpu_cloud_api_url = {sim.url}\ngpu_cloud_provider = rest\n")
    project = project_label(pytester.path.name)
    expired = cloud.leave(project, expires_in=-60)
    fresh = cloud.leave(project, expires_in=3600)
    other = cloud.leave("another-project", expires_in=-60)
    assert cleanup.main(["--yes"], cwd=pytester.path) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"1 instance(s) of project {project} past their expiry:"
    assert f"deleted {expired}" in out
    assert cloud.alive() == {fresh, other}


def test_session_takes_every_live_instance_of_that_session_only(
    cloud: Cloud, pytester: pytest.Pytester, capsys: pytest.CaptureFixture[str], sim: Sim
) -> None:
    pytester.makeini(f"[pytest]\ngpu_cloud_api_url = {sim.url}\ngpu_cloud_provider = rest\n")
    project = project_label(pytester.path.name)
    mine = {cloud.leave(project, expires_in=3600, session="gh-7-1-ab") for _ in range(2)}
    other = cloud.leave(project, expires_in=-60, session="gh-7-1-cd")
    assert cleanup.main(["--session", "gh-7-1-ab", "--yes"], cwd=pytester.path) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "2 instance(s) of session gh-7-1-ab:"
    assert all(f"deleted {i}" in out for i in mine)
    assert cloud.alive() == {other}


def test_older_than_takes_every_instance_of_the_project_older_than_that(
    cloud: Cloud, pytester: pytest.Pytester, capsys: pytest.CaptureFixture[str], sim: Sim
) -> None:
    pytester.makeini(f"[pytest]\ngpu_cloud_api_url = {sim.url}\ngpu_cloud_provider = rest\n")
    project = project_label(pytester.path.name)
    both = {cloud.leave(project, expires_in=3600), cloud.leave(project, expires_in=-1)}
    assert cleanup.main(["--older-than", "0s", "--yes"], cwd=pytester.path) == 0
    assert cloud.alive() == set()
    assert {line.split()[1] for line in capsys.readouterr().out.splitlines()[-2:]} == both
    assert cleanup.main(["--older-than", "2h"], cwd=pytester.path) == 0
    assert "no instances of project" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("pyproject.toml", '[tool.pytest.ini_options]\ngpu_cloud_api_url = "{url}"\n'),
        ("pytest.toml", '[pytest]\ngpu_cloud_api_url = "{url}"\n'),
        ("tox.ini", "[pytest]\ngpu_cloud_api_url = {url}\n"),
        ("setup.cfg", "[tool:pytest]\ngpu_cloud_api_url = {url}\n"),
    ],
)
def test_reads_the_settings_where_pytest_finds_them_from_a_subdirectory(
    cloud: Cloud,
    pytester: pytest.Pytester,
    capsys: pytest.CaptureFixture[str],
    sim: Sim,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    text: str,
) -> None:
    (pytester.path / name).write_text(text.format(url=sim.url))
    (pytester.path / "tests" / "deep").mkdir(parents=True)
    monkeypatch.chdir(pytester.path / "tests" / "deep")
    expired = cloud.leave(project_label(pytester.path.name), expires_in=-60)
    assert package_main(["cleanup", "--yes"]) == 0  # as python -m pytest_gpucloud runs it
    assert f"deleted {expired}" in capsys.readouterr().out


def test_asks_before_deleting_and_an_unanswerable_question_deletes_nothing(
    cloud: Cloud,
    pytester: pytest.Pytester,
    capsys: pytest.CaptureFixture[str],
    sim: Sim,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GPUCLOUD_API_URL", sim.url)
    expired = cloud.leave(project_label(pytester.path.name), expires_in=-60)
    monkeypatch.setattr("sys.stdin", io.StringIO("no\n"))
    assert cleanup.main([], cwd=pytester.path) == 0
    assert "nothing deleted" in capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert cleanup.main([], cwd=pytester.path) == 1
    assert "pass --yes" in capsys.readouterr().out
    assert cloud.alive() == {expired}
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    assert cleanup.main([], cwd=pytester.path) == 0
    assert cloud.alive() == set()


def test_a_failed_delete_exits_nonzero_and_names_the_instance(
    cloud: Cloud,
    pytester: pytest.Pytester,
    capsys: pytest.CaptureFixture[str],
    sim: Sim,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GPUCLOUD_API_URL", sim.url)
    expired = cloud.leave(project_label(pytester.path.name), expires_in=-60)
    sim.fault(kind="http_error", op="delete", status=400, code="invalid_request", times=None)
    assert cleanup.main(["--yes"], cwd=pytester.path) == 1
    err = capsys.readouterr().err
    assert f"{expired}: gpu-cloud: could not delete instance {expired}" in err
    assert err.splitlines()[-1].endswith(f"may still cost money: {expired}")
    sim.reset()


@pytest.mark.parametrize(("value", "why"), [("soon", "is not a duration"), ("-5", "is negative")])
def test_bad_older_than_is_a_usage_error(
    pytester: pytest.Pytester, capsys: pytest.CaptureFixture[str], value: str, why: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        cleanup.main([f"--older-than={value}"], cwd=pytester.path)
    assert exited.value.code == 2
    assert f"--older-than: '{value}' {why}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"GPUCLOUD_API_KEY": ""}, "--gpu-cloud has no GPU provider"),
        ({"GPUCLOUD_PROVIDER": "sim"}, "provider sim keeps no instances"),
        ({"GPUCLOUD_API_URL": "http://api.example.com"}, "must use https"),
        ({"GPUCLOUD_TIMEOUT": "soon"}, "GPUCLOUD_TIMEOUT 'soon'"),
    ],
)
def test_bad_settings_are_one_line_errors(
    pytester: pytest.Pytester,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    expected: str,
) -> None:
    monkeypatch.setenv("GPUCLOUD_API_KEY", "some-key")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cleanup.main([], cwd=pytester.path) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("gpu-cloud: ")
    assert expected in line


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert package_main(["sweep"]) == 2
    assert "unknown command 'sweep'" in capsys.readouterr().err


def test_version_comes_from_the_installed_package(capsys: pytest.CaptureFixture[str]) -> None:
    assert package_main(["--version"]) == 0
    assert capsys.readouterr().out == f"pytest-gpucloud {metadata.version('pytest-gpucloud')}\n"
