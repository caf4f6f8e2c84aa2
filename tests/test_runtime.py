"""Container runtimes, the setup command and the GPU health check.

Unit tests pin the exact command lines of each runtime. End-to-end, recording stand-ins of
the docker, podman and apptainer CLIs (tests/standins) go first on the sim instances' PATH;
they log every call and run ``exec`` commands directly. The real engine's sessions are in
test_container_engines.py.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from pytest_gpucloud.core.gpus import SeenGpu, Sighting, is_type, read_probe, type_name
from pytest_gpucloud.machine.preparation import setup_key
from pytest_gpucloud.machine.runtime import (
    DRIVER_DEVICE,
    Apptainer,
    Docker,
    Podman,
    Runtime,
    runtime_for,
)
from tests.cloud import GpuRun, Sim, Standins

WS = "/home/gpu/gpucloud/my proj"
IMAGE = "python:3.12-slim"


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")


# -- command lines ---------------------------------------------------------------------


def test_docker_command_lines() -> None:
    docker = Docker(image=IMAGE, workspace=WS, container="gpucloud-i-1")
    assert docker.has_image() == "docker image inspect --format '{{.Id}}' python:3.12-slim"
    assert docker.pull() == "docker pull -q python:3.12-slim"
    assert docker.start() == (
        "gpus=; test -e /dev/nvidiactl && gpus='--gpus all'; "
        "docker run -d --name gpucloud-i-1 $gpus --ipc=host "
        "-e CUDA_VISIBLE_DEVICES -e GPUCLOUD_SIM_GPU "
        "-v '/home/gpu/gpucloud/my proj:/home/gpu/gpucloud/my proj' "
        "-w '/home/gpu/gpucloud/my proj' --entrypoint sleep python:3.12-slim infinity"
    )
    assert docker.wrap("echo $HOME && true") == (
        "docker exec -i -w '/home/gpu/gpucloud/my proj' gpucloud-i-1 sh -c 'echo $HOME && true'"
    )
    assert docker.remove() == "docker rm -f gpucloud-i-1"


def test_podman_command_lines_use_cdi_devices() -> None:
    podman = Podman(image=IMAGE, workspace="/w", container="c")
    assert podman.start() == (
        "gpus=; test -e /dev/nvidiactl && gpus='--device nvidia.com/gpu=all'; "
        "podman run -d --name c $gpus --security-opt=label=disable "
        "--ipc=host -e CUDA_VISIBLE_DEVICES -e GPUCLOUD_SIM_GPU -v /w:/w -w /w "
        "--entrypoint sleep python:3.12-slim infinity"
    )
    assert podman.wrap("pytest") == "podman exec -i -w /w c sh -c pytest"
    assert podman.has_image() == "podman image inspect --format '{{.Id}}' python:3.12-slim"
    assert podman.pull() == "podman pull -q python:3.12-slim"
    assert podman.remove() == "podman rm -f -t 0 c"  # sleep ignores SIGTERM: no 10 s wait


@pytest.mark.parametrize(
    ("runtime", "said"),
    [
        ("podman", "Error: setting up CDI devices: unresolvable CDI devices nvidia.com/gpu=all"),
        (
            "docker",
            'docker: Error response from daemon: could not select device driver "" with '
            "capabilities: [[gpu]].",
        ),
    ],
)
def test_a_start_refused_for_want_of_gpu_support_names_the_fix(runtime: str, said: str) -> None:
    engine = runtime_for(runtime, image=IMAGE, workspace="/w", container="c")
    assert engine.explain(said).startswith(f"{said} (")
    assert "nvidia-ctk" in engine.explain(said)
    assert engine.explain("Error: no space left on device") == "Error: no space left on device"


def test_apptainer_command_lines() -> None:
    apptainer = Apptainer(
        image="nvcr.io/nvidia/pytorch:24.05-py3", workspace="/h/gc/p", container="c"
    )
    sif = "/h/gc/.images/nvcr.io_nvidia_pytorch_24.05-py3-"
    assert apptainer.sif.startswith(sif)
    assert apptainer.sif.endswith(".sif")
    assert apptainer.has_image() == f"test -f {apptainer.sif}"
    assert apptainer.pull() == (
        f"mkdir -p /h/gc/.images && apptainer pull --force {apptainer.sif} "
        "docker://nvcr.io/nvidia/pytorch:24.05-py3"
    )
    assert apptainer.start() is None
    assert apptainer.remove() is None
    assert apptainer.wrap("nvidia-smi -L") == (
        f"apptainer exec --nv --bind /h/gc/p --pwd /h/gc/p {apptainer.sif} sh -c 'nvidia-smi -L'"
    )


def test_apptainer_takes_a_sif_file_or_another_uri_as_it_is() -> None:
    local = Apptainer(image="/images/torch.sif", workspace="/w", container="c")
    assert local.sif == "/images/torch.sif"
    assert local.pull() is None
    assert local.has_image() == "test -f /images/torch.sif"
    remote = Apptainer(image="oras://ghcr.io/x/y:1", workspace="/w", container="c")
    assert remote.pull() is not None
    assert remote.pull().endswith(" oras://ghcr.io/x/y:1")  # type: ignore[union-attr]


def test_no_runtime_runs_commands_as_they_are() -> None:
    none = runtime_for("none", image=IMAGE, workspace="/w", container="c")
    assert type(none) is Runtime
    assert none.wrap("python3 -m x") == "python3 -m x"
    assert (none.has_image(), none.pull(), none.start(), none.remove()) == (None,) * 4
    assert isinstance(runtime_for("podman", image=IMAGE, workspace="/w", container="c"), Podman)


# -- GPU names and the health check -------------------------------------------------------


@pytest.mark.parametrize(
    ("smi", "name"),
    [
        ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
        ("NVIDIA A100-PCIE-40GB", "A100-40GB"),
        ("NVIDIA H100 80GB HBM3", "H100-80GB"),
        ("Tesla T4", "T4"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA GeForce RTX 4090", "GeForce-RTX-4090"),
    ],
)
def test_type_names_of_nvidia_smi_names(smi: str, name: str) -> None:
    assert type_name(smi) == name


@pytest.mark.parametrize(
    ("gpu", "wanted", "expected"),
    [
        (SeenGpu("NVIDIA A100-SXM4-80GB", 81920), "A100-80GB", True),
        (SeenGpu("NVIDIA A100-SXM4-80GB", 81920), "A100", True),
        (SeenGpu("NVIDIA A100-SXM4-40GB", 40960), "A100-80GB", False),
        (SeenGpu("NVIDIA A100-SXM4", 81559), "A100-80GB", True),  # by its memory
        (SeenGpu("NVIDIA H100 80GB HBM3", 81559), "H100", True),
        (SeenGpu("NVIDIA L40S", 46068), "L4", False),
        (SeenGpu("Tesla T4", 15360), "T4", True),
        (SeenGpu("T4"), "T4", True),
    ],
)
def test_is_type(gpu: SeenGpu, wanted: str, expected: bool) -> None:
    assert is_type(gpu, wanted) is expected


def test_read_probe_of_nvidia_smi_and_of_the_sim() -> None:
    seen = read_probe(0, "NVIDIA A100-SXM4-80GB, 81920\nNVIDIA A100-SXM4-80GB, 81920\n", "")
    assert seen.has("A100-80GB", 2)
    assert not seen.has("A100-80GB", 3)
    assert seen.describe() == "2 x NVIDIA A100-SXM4-80GB (80 GB)"
    sim = read_probe(0, "gpucloud-sim-gpu T4:2\n", "")
    assert sim.has("T4", 2)
    assert sim.simulated
    assert "simulated cloud declares" in sim.describe()
    missing = read_probe(127, "", "sh: 1: nvidia-smi: not found")
    assert not missing.has("T4", 1)
    assert missing.describe() == "no GPU (nvidia-smi: nvidia-smi not found)"
    failing = read_probe(9, "NVIDIA-SMI has failed because it couldn't communicate\n", "")
    assert "couldn't communicate" in failing.describe()
    assert Sighting().describe() == "no GPU (nvidia-smi listed none)"


# -- the setup's cache key ------------------------------------------------------------------


def test_setup_key_follows_the_files_the_command_names(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (tmp_path / "requirements.txt").write_text("numpy\n")
    (tmp_path / "other.py").write_text("")
    runtime = Runtime(image=IMAGE, workspace="/w", container="c")

    def key(command: str, container_id: str | None = None) -> str:
        return setup_key(command, tmp_path, runtime=runtime, container_id=container_id)

    editable, reqs = key("pip install -e .[test]"), key("pip install -r requirements.txt")
    (tmp_path / "other.py").write_text("changed = True\n")
    assert (key("pip install -e .[test]"), key("pip install -r requirements.txt")) == (
        editable,
        reqs,
    )
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'y'\n")
    assert key("pip install -e .[test]") != editable
    assert key("pip install -r requirements.txt") == reqs
    (tmp_path / "requirements.txt").write_text("numpy\ntorch\n")
    assert key("pip install --requirement=requirements.txt") != key(
        "pip install --requirement=other.py"
    )
    assert key("pip install -r requirements.txt") != reqs
    assert key("make setup", "id-1") != key("make setup", "id-2")  # another container


# -- end to end, through the stand-ins ----------------------------------------------------


TWO_TESTS = """
import os
import pytest

pytestmark = pytest.mark.gpu("T4")

def test_runs_in_the_workspace():
    assert os.path.isfile("test_two.py")

def test_sees_what_setup_made():
    with open("setup-made.txt") as f:
        assert f.read() == "ok\\n"
"""
SETUP = "echo setting up && echo ok > setup-made.txt"


def _last_instance(sim: Sim) -> dict[str, Any]:
    return sim.instances()[-1]


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.mark.parametrize("runtime", ["docker", "podman", "apptainer"])
def test_session_runs_through_each_runtime(
    runtime: str, gpu_run: GpuRun, sim: Sim, standins: Standins, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile(test_two=TWO_TESTS)
    result = gpu_run("--gpu-runtime", runtime, "--gpu-setup", SETUP)
    result.assert_outcomes(passed=2)
    instance = _last_instance(sim)
    ws = f"{instance['home']}/gpucloud/{pytester.path.name}"
    name = f"gpucloud-{instance['id']}"
    calls = [c["argv"] for c in standins.calls(runtime)]
    if runtime == "apptainer":
        sif = calls[0][2]
        assert sif.startswith(f"{instance['home']}/gpucloud/.images/python_3.12-slim-")
        assert calls[0] == ["pull", "--force", sif, "docker://python:3.12-slim"]
        execs = calls[1:]
        assert all(c[:7] == ["exec", "--nv", "--bind", ws, "--pwd", ws, sif] for c in execs)
    else:
        # GPU flags only where the machine (this one) has an NVIDIA driver
        gpus = {"docker": ["--gpus", "all"], "podman": ["--device", "nvidia.com/gpu=all"]}
        flags = gpus[runtime] if os.path.exists(DRIVER_DEVICE) else []
        flags += ["--security-opt=label=disable"] if runtime == "podman" else []
        assert calls[:3] == [
            ["image", "inspect", "--format", "{{.Id}}", IMAGE],
            ["pull", "-q", IMAGE],
            [
                "run", "-d", "--name", name, *flags, "--ipc=host",
                "-e", "CUDA_VISIBLE_DEVICES", "-e", "GPUCLOUD_SIM_GPU", "-v", f"{ws}:{ws}",
                "-w", ws, "--entrypoint", "sleep", IMAGE, "infinity",
            ],
        ]  # fmt: skip
        execs = calls[3:-1]
        assert all(c[:5] == ["exec", "-i", "-w", ws, name] for c in execs)
        assert calls[-1] == (
            ["rm", "-f", name] if runtime == "docker" else ["rm", "-f", "-t", "0", name]
        )
    # in the container: the setup-done check, the setup, the GPU check, the worker
    inner = [c[-1] for c in execs]
    assert len(inner) == 4
    assert inner[0].endswith('test -f "$marker"')
    assert f"sh -c '{SETUP}' 2>&1" in inner[1]
    assert "nvidia-smi --query-gpu=name,memory.total" in inner[2]
    assert "exec python3 -c " in inner[3]  # the worker's bootstrap (remote/boot.py)
    assert 'run_module("gpucloud_remote"' in inner[3]
    # the container goes before the instance does, and no secret is on any command line
    commands = instance["commands"]
    if runtime != "apptainer":
        removal = next(c for c in commands if c["command"].startswith(f"{runtime} rm -f"))
        assert _time(removal["ended_at"]) <= _time(instance["deleted_at"])
    for command in commands:
        assert sim.api_key not in command["command"]
    for call in standins.calls():
        assert sim.api_key not in json.dumps(call["argv"])
        assert "GPUCLOUD_API_KEY" not in call["env"]
    # the instance's status line: pull time, setup, the GPUs as the sim declares them
    result.stdout.fnmatch_lines(
        [
            f"gpu-cloud: T4 {instance['id']} ready in *s; "
            "image python:3.12-slim pulled in *s; *"
            "setup ran in *s (log: *-setup.log); "
            "GPUs: 1 x T4, as the simulated cloud declares it (GPUCLOUD_SIM_GPU; no GPU to check)"
        ]
    )
    log = pytester.path / ".gpucloud" / "logs" / f"{instance['id']}-setup.log"
    assert log.read_text() == "setting up\n"


def test_different_images_get_different_containers(
    gpu_run: GpuRun, sim: Sim, standins: Standins, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.gpu("T4", image="torch:a")
        def test_a():
            pass

        @pytest.mark.gpu("T4", image="torch:b")
        def test_b():
            pass
        """
    )
    gpu_run("--gpu-runtime", "docker").assert_outcomes(passed=2)
    runs = [c["argv"] for c in standins.calls("docker") if c["argv"][0] == "run"]
    assert sorted(run[-2] for run in runs) == ["torch:a", "torch:b"]
    assert len({run[3] for run in runs}) == 2
    assert not json.loads((standins.path / "state.json").read_text())["containers"]


def test_failed_setup_errors_its_tests_with_the_log(
    gpu_run: GpuRun, sim: Sim, standins: Standins, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile(test_two=TWO_TESTS)
    result = gpu_run("--gpu-runtime", "docker", "--gpu-setup", "echo no such package >&2; exit 3")
    result.assert_outcomes(errors=2)
    instance = _last_instance(sim)
    log = pytester.path / ".gpucloud" / "logs" / f"{instance['id']}-setup.log"
    assert log.read_text() == "no such package\n"
    result.stdout.fnmatch_lines(
        [f"*gpu-cloud: setup failed on instance {instance['id']} (exit status 3 of *{log}*"]
    )
    assert instance["status"] == "terminated"
    assert [c["argv"][0] for c in standins.calls("docker")][-1] == "rm"


def test_image_that_cannot_be_pulled_is_an_error_naming_it(
    gpu_run: GpuRun, sim: Sim, standins: Standins, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile(test_two=TWO_TESTS)
    result = gpu_run("--gpu-runtime", "podman", "--gpu-image", "registry.invalid/nope:1")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(
        ["*gpu-cloud: pulling image registry.invalid/nope:1 on instance i-* failed: *denied*"]
    )


def test_wrong_gpus_are_replaced_once(gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_two=TWO_TESTS)
    before = len(sim.instances())
    sim.fault(kind="wrong_gpu", gpu="A10G:1", times=1)
    result = gpu_run("--gpu-setup", SETUP)
    result.assert_outcomes(passed=2)
    first, second = sim.instances()[before:]
    assert first["status"] == second["status"] == "terminated"
    assert second["deleted_at"] > first["deleted_at"]


def test_wrong_gpus_twice_error_the_tests_naming_what_was_found(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile(test_two=TWO_TESTS)
    before = len(sim.instances())
    sim.fault(kind="wrong_gpu", gpu="A10G:1", times=2)
    result = gpu_run()
    result.assert_outcomes(errors=2)
    assert len(sim.instances()) == before + 2
    result.stdout.fnmatch_lines(
        [
            "*gpu-cloud: instance i-* was asked for 1 x T4 but shows 1 x A10G, as the simulated "
            "cloud declares it*; it was released and replaced once, but the replacement "
            "instance i-* was asked for 1 x T4 but shows 1 x A10G*"
        ]
    )


def test_an_unknown_runtime_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ngpu_cloud_runtime = rkt\n")
    result = pytester.runpytest_inprocess("--gpu-cloud", "--gpu-provider", "sim")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert (
        "gpu-cloud: ini gpu_cloud_runtime 'rkt': Input should be 'none', 'docker', 'podman' or "
        "'apptainer'" in result.stderr.str()
    )
