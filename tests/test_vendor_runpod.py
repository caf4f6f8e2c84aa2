"""The ``runpod`` provider end to end on the simulated cloud's RunPod dialect (REST v2), and
the facts of RunPod's API that the provider and the dialect rely on (each names its source)."""

from __future__ import annotations

import os
import re
import select
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import httpx
import pytest

from pytest_gpucloud.cli import cleanup
from pytest_gpucloud.providers.runpod import HOST_KEY_ENV, start_command
from tests.vendor_sims import GPU_TEST, KEY, VendorRun, VendorSim, start


@pytest.fixture
def pod_sim() -> Iterator[VendorSim]:
    yield from start("runpod")


@pytest.fixture
def run(
    pytester: pytest.Pytester, pod_sim: VendorSim, monkeypatch: pytest.MonkeyPatch
) -> VendorRun:
    pytester.makepyfile(test_gpu=GPU_TEST)
    return VendorRun(pytester, pod_sim, monkeypatch)


def test_a_gpu_test_passes_after_the_ssh_address_shows_and_failover_on_capacity(
    run: VendorRun, pod_sim: VendorSim
) -> None:
    pod_sim.fault(kind="http_error", op="create", status=400, code="out_of_capacity")
    pod_sim.fault(kind="address_late", delay_s=0.5)
    run("-p", "no:randomly").assert_outcomes(passed=1)
    assert [r["status"] for r in pod_sim.calls("POST", "/pods")] == [400, 201]
    pod_sim.wait_gone()


def test_inject_refuses_a_pod_that_presents_another_host_key(
    run: VendorRun, pod_sim: VendorSim
) -> None:
    pod_sim.fault(kind="wrong_host_key")
    result = run("-p", "no:randomly", "--gpu-retries", "0")
    assert "passed" not in result.parseoutcomes()
    result.stdout.fnmatch_lines(["*presented an SSH host key that differs*"])


def test_a_refused_key_is_one_clear_error(run: VendorRun, monkeypatch: pytest.MonkeyPatch) -> None:
    """Source: RunPod REST v2 spec, components.responses.UnauthorizedError (401)."""
    monkeypatch.setenv("RUNPOD_API_KEY", "wrong")
    result = run("-p", "no:randomly")
    assert result.ret != 0
    text = result.stdout.str() + result.stderr.str()
    assert "RunPod refused the API key" in text
    assert "check RUNPOD_API_KEY" in text
    assert "Traceback" not in text


def test_a_container_runtime_inside_a_pod_is_a_usage_error(run: VendorRun) -> None:
    result = run("--gpu-runtime", "docker")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*a RunPod pod is itself a container*--gpu-runtime none*"])


def test_cleanup_deletes_an_orphan_found_by_its_name(
    pod_sim: VendorSim,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    name = f"gpucloud-0123456789ab-{int(time.time()) - 60}"
    made = pod_sim.api.post(
        "/pods",
        json={
            "name": name,
            "image": "python:3.12-slim",
            "gpu": {"id": "NVIDIA T4", "count": 1},
            "env": {"PUBLIC_KEY": KEY},
            "ports": ["22/tcp"],
        },
    )
    assert made.status_code == 201
    foreign = pod_sim.api.post(
        "/pods",
        json={
            "name": "someone-elses",
            "image": "python:3.12-slim",
            "gpu": {"id": "NVIDIA T4", "count": 1},
            "env": {"PUBLIC_KEY": KEY},
        },
    ).json()["id"]
    monkeypatch.setenv("RUNPOD_API_KEY", pod_sim.api_key)
    monkeypatch.setenv("GPUCLOUD_PROVIDER", "runpod")
    monkeypatch.setenv("GPUCLOUD_API_URL", pod_sim.base_url)
    assert cleanup.main(["--yes"], cwd=tmp_path) == 0
    assert f"deleted {made.json()['id']}" in capsys.readouterr().out
    pod_sim.wait_gone(keep=frozenset({foreign}))
    assert [i["id"] for i in pod_sim.live()] == [foreign]
    pod_sim.api.delete(f"/pods/{foreign}").raise_for_status()


def test_pod_answers_and_errors_are_as_documented(pod_sim: VendorSim) -> None:
    """Sources: RunPod REST v2 spec (github:runpod/docs api-reference-v2/openapi.json, 2.0.0):
    ``POST /v2/pods`` answers 201; ``ssh.direct`` null until the address exists (a live
    capture shows RUNNING with ``direct: null``); errors are problem+json (``title``,
    ``status``, ``detail``); no capacity is a 400 "There are no longer any instances
    available with the requested specifications" (recorded live v2 payload)."""
    body = {
        "name": "n",
        "image": "i",
        "gpu": {"id": "NVIDIA T4", "count": 1},
        "env": {"PUBLIC_KEY": KEY},
    }
    made = pod_sim.api.post("/pods", json=body)
    assert made.status_code == 201
    assert made.json()["ssh"]["direct"] is None
    time.sleep(0.3)
    pod = pod_sim.api.get(f"/pods/{made.json()['id']}").json()
    assert pod["status"] == "RUNNING"
    assert pod["ssh"]["direct"] is None  # no 22/tcp among its ports
    pod_sim.api.delete(f"/pods/{pod['id']}").raise_for_status()
    pod_sim.fault(kind="http_error", op="create", status=400, code="out_of_capacity")
    refused = pod_sim.api.post("/pods", json=body)
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["status"] == 400
    assert "no longer any instances available" in refused.json()["detail"]
    missing = pod_sim.api.get("/pods/nope")
    assert (missing.status_code, missing.json()["title"]) == (404, "Not Found")


def test_the_standalone_sim_speaks_the_dialect_and_prints_its_base_url() -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "pytest_gpucloud.sim", "--port", "0", "--dialect", "runpod"],
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        assert select.select([proc.stdout], [], [], 20)[0], "the sim printed nothing"
        line = proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:\d+/v2", line)
        assert match is not None, line
        key = proc.stdout.readline().rsplit(" ", 1)[1].strip()  # the key it made
        gpus = httpx.get(
            f"{match.group()}/catalog/gpus", headers={"Authorization": f"Bearer {key}"}
        )
        assert "H100" in {gpu["name"] for gpu in gpus.json()["gpus"]}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


def test_the_start_command_installs_the_host_key_then_runs_the_images_start(
    tmp_path: Path,
) -> None:
    """The pod's ``args`` (its entrypoint's arguments, REST v2 spec): valid shell that writes
    the injected key, forgets it, starts /start.sh and lives as long as the lifetime."""
    argv = shlex.split(start_command(3600))
    assert argv[:2] == ["bash", "-c"]
    script = argv[2]
    assert subprocess.run(["bash", "-n", "-c", script], check=False).returncode == 0
    assert script.endswith("unset GPUCLOUD_SSH_HOST_KEY; /start.sh & exec sleep 3600")
    # Run with the paths moved under tmp_path (and no ssh-keygen, which this machine may
    # lack): the key lands, nothing of it is echoed.
    key = asyncssh.generate_private_key("ssh-ed25519")
    local = (
        script.replace("/etc/ssh", str(tmp_path))
        .replace("ssh-keygen -y -f", "cat")
        .replace("/start.sh & exec sleep 3600", "true")
    )
    env = {"PATH": os.environ["PATH"], HOST_KEY_ENV: key.export_private_key().decode()}
    done = subprocess.run(["bash", "-c", local], env=env, capture_output=True, check=False)
    assert done.returncode == 0
    assert done.stdout == done.stderr == b""
    written = asyncssh.import_private_key((tmp_path / "ssh_host_ed25519_key").read_text())
    assert written.export_public_key() == key.export_public_key()
    assert (tmp_path / "ssh_host_ed25519_key").stat().st_mode & 0o077 == 0
