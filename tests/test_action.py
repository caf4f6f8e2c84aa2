"""The composite action (action.yml), run step by step with bash as a GitHub runner would
(tests/action_harness.py), against the simulated cloud: a passing job, a failing job, and a
job whose pytest step is killed with SIGKILL midway."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import asyncssh
import httpx
import pytest

from pytest_gpucloud.core.labels import EXPIRES, OWNER, PROJECT, SESSION, project_label
from tests.action_harness import ACTION, Job, Runner, load_action
from tests.cloud import Sim

GPU_TESTS = """\
import time
from pathlib import Path

import pytest


@pytest.mark.gpu("T4")
def test_passes():
    assert sum([1, 2]) == 3


@pytest.mark.gpu("T4")
def test_fails():
    assert 2 + 2 == 5


@pytest.mark.gpu("T4")
def test_hangs():
    (Path.home() / "started").touch()
    time.sleep(120)


def test_local():
    assert True
"""
FAILING_LINE = 14
PYTEST_STEP = "pytest --gpu-cloud"


@pytest.fixture(scope="module")
def runner_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What setup-python gives a job: a fresh Python environment. Offline here, it sees this
    environment's packages (the plugin's dependencies) but not the plugin itself, which the
    action's install step builds from the repository."""
    venv = tmp_path_factory.mktemp("runner") / "python"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = subprocess.run(
        [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(purelib) / "runner-tools.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return venv / "bin"


def _job(tmp_path: Path, sim: Sim, python: Path, pytest_args: str) -> tuple[Job, Runner]:
    project = tmp_path / "repo"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\n")
    (project / "test_gpu.py").write_text(GPU_TESTS)
    temp = tmp_path / "runner-temp"
    temp.mkdir()
    environ = {
        "PATH": f"{python}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "CI": "true",
        "GITHUB_ACTIONS": "true",
        "GITHUB_RUN_ID": "4242",
        "GITHUB_RUN_ATTEMPT": "1",
        "GITHUB_WORKSPACE": str(project),
        "RUNNER_TEMP": str(temp),
        "GITHUB_ACTION_PATH": str(ACTION.parent),
        # The workflow's `env: GPUCLOUD_API_KEY: ${{ secrets.GPUCLOUD_API_KEY }}`
        "GPUCLOUD_API_KEY": sim.api_key,
        # Offline: pip builds the plugin with this environment's hatchling.
        "PIP_NO_INDEX": "1",
        "PIP_NO_BUILD_ISOLATION": "0",
    }
    inputs = {"pytest-args": pytest_args, "provider": "rest", "api-url": sim.url}
    return Job(project, inputs, environ), Runner(load_action(), temp)


def _session_instances(sim: Sim, session_id: str) -> list[dict[str, object]]:
    return [i for i in sim.instances() if i["labels"].get(SESSION) == session_id]


def _live(sim: Sim, session_id: str) -> set[str]:
    live = {i["id"] for i in sim.live()}
    return {str(i["id"]) for i in _session_instances(sim, session_id)} & live


def test_a_passing_job_reports_its_cost_and_leaves_nothing(
    tmp_path: Path, sim: Sim, runner_python: Path
) -> None:
    job, runner = _job(tmp_path, sim, runner_python, "-p no:randomly -k 'passes or local'")
    outputs = runner.run(job)
    assert [(s.name, s.returncode) for s in job.steps] == [
        ("Install pytest-gpucloud", 0),
        ("Choose the session id", 0),
        (PYTEST_STEP, 0),
        ("Read the run report", 0),
        ("Delete every instance of this session", 0),
    ], job.text()
    session_id = job.outputs["session"]["id"]
    assert session_id.startswith("gh-4242-1-")
    report = json.loads(Path(outputs["report"]).read_text())
    made = {str(i["id"]) for i in _session_instances(sim, session_id)}
    assert {i["id"] for i in report["instances"]} == made
    assert outputs["instances"] == str(len(made)) == "1"
    assert float(outputs["total-cost"]) == report["total_cost"] > 0
    assert "**2 test(s):** 2 passed" in job.summary
    assert f"| `{next(iter(made))}` | T4 |" in job.summary
    assert '<img alt="timeline" src="data:image/svg+xml;base64,' in job.summary
    assert not [line for line in job.step(PYTEST_STEP).stdout.splitlines() if "::" in line[:9]]
    assert _live(sim, session_id) == set()
    assert sim.api_key not in job.text()


def test_summary_false_writes_no_job_summary(tmp_path: Path, sim: Sim, runner_python: Path) -> None:
    job, runner = _job(tmp_path, sim, runner_python, "-p no:randomly -k passes")
    job.inputs = {**job.inputs, "summary": "false"}
    outputs = runner.run(job)
    assert not job.failed, job.text()
    assert outputs["instances"] == "1"
    assert job.summary == ""


def test_a_failing_job_annotates_the_failure_and_still_cleans_up(
    tmp_path: Path, sim: Sim, runner_python: Path
) -> None:
    job, runner = _job(tmp_path, sim, runner_python, "-p no:randomly -k 'fails or local'")
    outputs = runner.run(job)
    assert [(s.name, s.returncode) for s in job.steps][2:] == [
        (PYTEST_STEP, 1),
        ("Read the run report", 0),
        ("Delete every instance of this session", 0),
    ], job.text()
    (instance,) = json.loads(Path(outputs["report"]).read_text())["instances"]
    errors = [s for s in job.step(PYTEST_STEP).stdout.splitlines() if s.startswith("::error")]
    assert errors == [
        f"::error file=test_gpu.py,line={FAILING_LINE},title=test_gpu.py%3A%3Atest_fails failed "
        f"on T4 {instance['id']}::assert (2 + 2) == 5"
    ]
    assert "### Failed remote tests" in job.summary
    assert f"| `test_gpu.py::test_fails` (failed) | `T4 {instance['id']}` |" in job.summary
    assert _live(sim, job.outputs["session"]["id"]) == set()
    assert sim.api_key not in job.text()


def test_a_killed_job_leaks_nothing_of_its_session_and_touches_no_other(
    tmp_path: Path, sim: Sim, runner_python: Path
) -> None:
    other = _leave_instance(sim, session="another-job")
    job, runner = _job(tmp_path, sim, runner_python, "-p no:randomly -k hangs")
    left_by_the_kill: set[str] = set()

    def kill_midway(step: str, process: subprocess.Popen[str]) -> None:
        if step != PYTEST_STEP:
            return
        session_id = job.outputs["session"]["id"]
        deadline = time.monotonic() + 120
        while not any(
            Path(str(i["home"]), "started").exists() for i in _session_instances(sim, session_id)
        ):
            assert process.poll() is None, "pytest ended before its test started"
            assert time.monotonic() < deadline, "the remote test never started"
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        left_by_the_kill.update(_live(sim, session_id))

    try:
        runner.run(job, while_running=kill_midway)
        assert left_by_the_kill, "the killed session left no instance: nothing was shown"
        assert job.step(PYTEST_STEP).returncode == -signal.SIGKILL
        cleanup = job.step("Delete every instance of this session")
        assert cleanup.returncode == 0, cleanup.stdout + cleanup.stderr
        assert all(f"deleted {i}" in cleanup.stdout for i in left_by_the_kill)
        assert _live(sim, job.outputs["session"]["id"]) == set()
        assert other in {i["id"] for i in sim.live()}
        assert sim.api_key not in job.text()
    finally:
        sim.delete(other)


def _leave_instance(sim: Sim, *, session: str) -> str:
    labels = {
        SESSION: session,
        PROJECT: project_label("repo"),
        OWNER: "someone",
        EXPIRES: str(int(time.time()) - 60),
    }
    body = {
        "gpu_type": "T4",
        "image": "python:3.12-slim",
        "ssh_public_key": asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode(),
        "labels": labels,
        "max_lifetime_s": 3600,
        "client_token": secrets.token_hex(8),
    }
    headers = {"Authorization": f"Bearer {sim.api_key}"}
    response = httpx.post(f"{sim.url}/v1/instances", json=body, headers=headers, timeout=10)
    response.raise_for_status()
    instance_id: str = response.json()["id"]
    return instance_id


@pytest.mark.parametrize("broken", [False, True])
def test_action_yml_is_valid_against_the_github_action_schema(tmp_path: Path, broken: bool) -> None:
    """check-jsonschema's bundled schema of action metadata (actionlint has no PyPI wheel
    for this platform); the broken copy shows the check can fail."""
    text = ACTION.read_text()
    if broken:
        text = text.replace("      shell: bash\n", "", 1)  # a composite run step needs it
    checked = tmp_path / "action.yml"
    checked.write_text(text)
    tool = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent))
    assert tool is not None
    result = subprocess.run(
        [tool, "--builtin-schema", "vendor.github-actions", str(checked)],
        capture_output=True,
        text=True,
    )
    assert (result.returncode != 0) is broken, result.stdout + result.stderr


def test_the_action_never_names_the_api_key_in_its_scripts() -> None:
    action = load_action()
    for step in action["runs"]["steps"]:
        script = step.get("run", "")
        assert "GPUCLOUD_API_KEY" not in script
        assert "set -x" not in script
        assert "${{ secrets." not in json.dumps(step)
