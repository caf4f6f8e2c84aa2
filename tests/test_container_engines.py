"""Sessions through a real container engine: podman (set up by ``tests/podman/setup``), and
docker where a daemon answers. Each test runs once per engine; ``-k podman`` selects
podman's.

What the remote tests assert, they assert from inside: the engine's mark of a container,
and the container's first process (its ``sleep``) as PID 1.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_gpucloud.machine.runtime import runtime_for
from pytest_gpucloud.remote.fixtures import artifacts_dir_name
from tests import engines
from tests.cloud import STANDINS, GpuRun, Sim
from tests.engines import INSIDE, Engine

SETUP = "echo ok > /opt/made-by-setup && echo ran >> setup-runs.txt"
INSIDE_TESTS = """
import glob
import os
import socket

import pytest

pytestmark = pytest.mark.gpu("{gpu}")


def test_runs_in_the_container(gpu_artifacts):
    assert os.path.exists({inside!r})
    with open("/proc/1/cmdline", "rb") as f:
        assert f.read().split(b"\\0")[:2] == [b"sleep", b"infinity"]
    (gpu_artifacts / "host.txt").write_text(socket.gethostname())


def test_setup_ran_in_it_once():
    with open("/opt/made-by-setup") as f:
        assert f.read() == "ok\\n"
    with open("setup-runs.txt") as f:
        assert f.read() == "ran\\n"
    home = os.path.expanduser("~")
    assert glob.glob(home + "/.cache/pytest-gpucloud/setup-*")  # the marker of its cache
"""


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")


@pytest.fixture(scope="session", params=["podman", "docker"])
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    if request.param == "podman":
        podman: Engine = request.getfixturevalue("podman_engine")
        return podman
    folder = tmp_path_factory.mktemp("docker-cli")
    return engines.docker(folder, request.getfixturevalue("podman_engine"))


@pytest.fixture
def engine_sim(sim: Sim, engine: Engine) -> Iterator[Sim]:
    """The simulated cloud, its machines with the engine's CLI first on their PATH; the test
    fails if one of its instances leaves a container behind."""
    before = {i["id"] for i in sim.instances()}
    sim.configure(extra_path=str(engine.path))
    try:
        yield sim
    finally:
        sim.configure(extra_path=None)
    left = [
        name
        for instance in sim.instances()
        if instance["id"] not in before
        for name in engine.containers(f"gpucloud-{instance['id']}")
    ]
    for name in left:
        engine("rm", "-f", name, check=False)
    assert not left, f"containers left behind: {left}"


def _new(sim: Sim, before: set[str]) -> list[dict[str, Any]]:
    return [i for i in sim.instances() if i["id"] not in before]


def _wait_until(check: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return found


def test_tests_setup_and_artifacts_run_in_the_container_on_the_sim(
    engine: Engine, engine_sim: Sim, gpu_run: GpuRun, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile(test_inside=INSIDE_TESTS.format(gpu="T4", inside=INSIDE[engine.name]))
    before = {i["id"] for i in engine_sim.instances()}
    result = gpu_run(
        *("--gpu-runtime", engine.name, "--gpu-image", engine.image, "--gpu-setup", SETUP),
        *("--gpu-artifacts-dir", "arts"),
    )
    result.assert_outcomes(passed=2)
    (instance,) = _new(engine_sim, before)
    result.stdout.fnmatch_lines(
        [
            f"gpu-cloud: T4 {instance['id']} ready in *s; image {engine.image} present; "
            f"{engine.name} container gpucloud-{instance['id']}; setup ran in *s *; "
            "GPUs: 1 x T4, as the simulated cloud declares it *"
        ]
    )
    host = pytester.path / "arts" / artifacts_dir_name("test_inside.py::test_runs_in_the_container")
    assert re.fullmatch(r"[0-9a-f]{12}", (host / "host.txt").read_text())  # the container's id
    assert not Path("/opt/made-by-setup").exists()  # the setup ran in the container only
    assert instance["status"] == "terminated"
    assert "WARN" not in result.stdout.str() + result.stderr.str()


def test_each_image_gets_a_container_of_its_own(
    engine: Engine, engine_sim: Sim, gpu_run: GpuRun, pytester: pytest.Pytester
) -> None:
    other = engine.derived("other", "GPUCLOUD_TEST_IMAGE=other")
    pytester.makepyfile(
        test_images=f"""
        import os
        import socket

        import pytest


        @pytest.mark.gpu("T4")
        def test_default_image(gpu_artifacts):
            assert "GPUCLOUD_TEST_IMAGE" not in os.environ
            (gpu_artifacts / "host.txt").write_text(socket.gethostname())


        @pytest.mark.gpu("T4", image={other!r})
        def test_other_image(gpu_artifacts):
            assert os.environ["GPUCLOUD_TEST_IMAGE"] == "other"
            (gpu_artifacts / "host.txt").write_text(socket.gethostname())
        """
    )
    before = {i["id"] for i in engine_sim.instances()}
    result = gpu_run(
        "--gpu-runtime", engine.name, "--gpu-image", engine.image, "--gpu-artifacts-dir", "arts"
    )
    result.assert_outcomes(passed=2)
    assert len(_new(engine_sim, before)) == 2
    hosts = {
        (pytester.path / "arts" / artifacts_dir_name(f"test_images.py::{test}"))
        .joinpath("host.txt")
        .read_text()
        for test in ("test_default_image", "test_other_image")
    }
    assert len(hosts) == 2


GPUS = "GPU-podman-0|Tesla T4|15360;GPU-podman-1|NVIDIA L4|23034"


@pytest.fixture
def local_gpus(
    engine: Engine, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[list[str]]:
    """This machine as the ``local`` provider sees it: two GPUs (a T4, slot 0, and an L4,
    slot 1) of the stand-in nvidia-smi, and the engine's CLI first on the PATH. Yields the
    session's options: the engine, and a setup that installs the stand-in into the container
    too. The test fails if its container is left behind (a test leases one slot: that of
    its module's name, ``test_slot<N>``)."""
    smi = tmp_path / "smi-bin"
    smi.mkdir()
    shutil.copy2(STANDINS / "nvidia-smi", smi / "nvidia-smi")
    monkeypatch.setenv("PATH", os.pathsep.join([str(engine.path), str(smi), os.environ["PATH"]]))
    monkeypatch.setenv("STANDIN_NVIDIA_GPUS", GPUS)
    monkeypatch.setenv("GPUCLOUD_API_KEY", "not-for-the-tests")
    shutil.copy2(STANDINS / "nvidia-smi", pytester.path / "nvidia-smi")
    (pytester.path / "nvidia-smi.gpus").write_text(GPUS)
    setup = f"cp nvidia-smi nvidia-smi.gpus /usr/local/bin/ && {SETUP}"
    yield [
        *("--gpu-cloud", "--gpu-provider", "local"),
        *("--gpu-runtime", engine.name, "--gpu-image", engine.image, "--gpu-setup", setup),
    ]
    (module,) = pytester.path.glob("test_slot*.py")
    left = engine.containers(f"gpucloud-local-gpu{module.stem.removeprefix('test_slot')}")
    for name in left:
        engine("rm", "-f", name, check=False)
    assert not left, f"containers left behind: {left}"


def test_local_provider_runs_tests_in_a_container_of_its_gpu_slot(
    engine: Engine, local_gpus: list[str], pytester: pytest.Pytester
) -> None:
    pytester.makepyfile(
        test_slot1=INSIDE_TESTS.format(gpu="L4", inside=INSIDE[engine.name])
        + "\n\ndef test_sees_its_gpu_slot():\n"
        + "    assert os.environ['CUDA_VISIBLE_DEVICES'] == '1'\n"
    )
    result = pytester.runpytest_inprocess(*local_gpus, "--gpu-artifacts-dir", "arts")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        [
            f"gpu-cloud: L4 local-gpu1 ready in *s; image {engine.image} present; "
            f"{engine.name} container gpucloud-local-gpu1; setup ran in *s *; "
            "GPUs: 1 x NVIDIA L4 (*"
        ]
    )
    host = pytester.path / "arts" / artifacts_dir_name("test_slot1.py::test_runs_in_the_container")
    assert re.fullmatch(r"[0-9a-f]{12}", (host / "host.txt").read_text())
    assert engine.containers("gpucloud-local-gpu1") == []


SLOW = """
import time

import pytest


@pytest.mark.gpu("T4")
def test_slow():
    open("started", "w").close()
    time.sleep(120)
"""


@pytest.mark.parametrize("provider", ["sim", "local"])
def test_sigterm_of_the_session_removes_the_container(
    provider: str, engine: Engine, pytester: pytest.Pytester, request: pytest.FixtureRequest
) -> None:
    pytester.makepyfile(test_slot0=SLOW)  # a T4: slot 0 on local
    sim: Sim | None = None
    if provider == "sim":
        sim = request.getfixturevalue("engine_sim")
        args = [*request.getfixturevalue("gpu_run").args()]
        args += ["--gpu-runtime", engine.name, "--gpu-image", engine.image]
    else:
        args = request.getfixturevalue("local_gpus")
    before = {i["id"] for i in sim.instances()} if sim else set()

    def started() -> str | None:
        """The container whose test marked its start in its workspace (the working
        directory of ``exec``), if there is one."""
        ids = [i["id"] for i in _new(sim, before)] if sim else ["local-gpu0"]
        for name in (f"gpucloud-{id_}" for id_ in ids):
            if engine("exec", name, "test", "-f", "started", check=False).returncode == 0:
                return name
        return None

    command = [sys.executable, "-m", "pytest", *args]
    with (pytester.path / "out.txt").open("wb") as out:
        session = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=pytester.path)
    try:
        name = _wait_until(started, "the test to start in its container")
        session.send_signal(signal.SIGTERM)
        assert session.wait(60) == pytest.ExitCode.INTERRUPTED
    finally:
        session.kill()
    output = (pytester.path / "out.txt").read_text()
    assert "Traceback" not in output
    assert engine.containers(name) == []
    if sim is not None:
        assert not [i for i in sim.live() if i["id"] not in before], "the instance outlived it"


def test_gpus_without_their_engine_support_are_explained(engine: Engine) -> None:
    """A machine with no way to give containers GPUs: the engine's own refusal is what the
    runtime recognizes, and the start's error names the fix."""
    if os.path.exists("/dev/nvidiactl"):
        pytest.skip("this machine has an NVIDIA driver: the engine may well give GPUs")
    runtime = runtime_for(engine.name, image=engine.image, workspace="/w", container="c")
    flags = {"podman": ["--device", "nvidia.com/gpu=all"], "docker": ["--gpus", "all"]}
    refused = engine("run", "--rm", *flags[engine.name], engine.image, "true", check=False)
    assert refused.returncode != 0
    said = refused.stderr.strip().splitlines()[-1]
    assert runtime.explain(said) != said
    assert "nvidia-ctk" in runtime.explain(said)


def test_podman_takes_gpus_as_cdi_devices_because_it_ignores_the_gpus_flag(
    podman_engine: Engine,
) -> None:
    """podman 4 accepts docker's ``--gpus`` with any value and gives no GPU: the podman
    runtime asks for the CDI device instead (README, "Containers")."""
    ignored = podman_engine("run", "--rm", "--gpus", "no-such-gpu", podman_engine.image, "true")
    assert ignored.returncode == 0
    cdi = podman_engine(
        *("run", "--rm", "--device", "nvidia.com/gpu=no-such-gpu", podman_engine.image, "true"),
        check=False,
    )
    assert "unresolvable CDI devices nvidia.com/gpu=no-such-gpu" in cdi.stderr
