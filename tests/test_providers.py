"""Providers: the registry (hook, entry points), ``local`` (this machine's GPUs) and ``ssh``
(static hosts; here the simulated cloud's SSH servers, used as such).

No GPU is here: the ``local`` provider's slots are tested with a stand-in nvidia-smi
(tests/standins) that lists made-up GPUs.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import httpx
import pytest

from pytest_gpucloud.core.addresses import StaticHost, parse_hosts
from pytest_gpucloud.core.catalog import GpuType, Offer
from pytest_gpucloud.core.errors import OutOfCapacity
from pytest_gpucloud.providers.static_hosts import SshProvider
from tests.cloud import STANDINS, GpuRun, Sim, Standins, standin_gpus

ONE_TEST = "import pytest\n\n@pytest.mark.gpu('T4')\ndef test_a():\n    pass\n"


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")


# -- the registry -----------------------------------------------------------------------

CONFTEST = """
import pytest
from pytest_gpucloud.providers.rest import RestProvider


class MyCloud(RestProvider):
    name = "mycloud"


async def make_mycloud(settings):
    return MyCloud(settings.api_url, settings.api_key.get_secret_value())


@pytest.hookimpl(optionalhook=True)
def pytest_gpucloud_register_providers():
    return {"mycloud": make_mycloud}
"""


def test_a_conftest_registers_a_provider(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester
) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(ONE_TEST)
    before = len(sim.instances())
    result = pytester.runpytest_inprocess(
        "--gpu-cloud", "--gpu-provider", "mycloud", "--gpu-api-url", sim.url
    )
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["gpu-cloud: provider mycloud"])
    assert len(sim.instances()) == before + 1
    unknown = pytester.runpytest_inprocess("--gpu-cloud", "--gpu-provider", "othercloud")
    assert unknown.ret == pytest.ExitCode.USAGE_ERROR
    unknown.stderr.fnmatch_lines(
        [
            "*--gpu-provider 'othercloud': unknown GPU provider; choose one of: "
            "lambda, local, lyceum, mycloud, rest, runpod, sim, ssh"
        ]
    )


def test_a_provider_registered_twice_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST.replace('{"mycloud"', '{"sim"'))
    result = pytester.runpytest_inprocess("--gpu-cloud", "--gpu-provider", "sim")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "*GPU provider 'sim' is registered twice: by conftest:make_mycloud (from the hook "
            "pytest_gpucloud_register_providers) and by pytest_gpucloud.providers:_sim*"
        ]
    )
    assert "Traceback" not in result.stderr.str()


def test_an_entry_point_registers_a_provider(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester
) -> None:
    dist = pytester.mkdir("epcloud-0.1.dist-info")
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: epcloud\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[pytest_gpucloud.providers]\nepcloud = epcloud:make\nbroken = epcloud:missing\n"
    )
    pytester.makepyfile(
        epcloud=CONFTEST.replace("make_mycloud(", "make(").split("@pytest.hookimpl")[0],
        test_one=ONE_TEST,
    )
    pytester.syspathinsert()  # where importlib.metadata finds the distribution
    args = ["--gpu-cloud", "--gpu-api-url", sim.url]
    result = pytester.runpytest_inprocess(*args, "--gpu-provider", "epcloud")
    result.assert_outcomes(passed=1)
    broken = pytester.runpytest_inprocess(*args, "--gpu-provider", "broken")
    assert broken.ret == pytest.ExitCode.USAGE_ERROR
    broken.stderr.fnmatch_lines(
        [
            "*GPU provider 'broken' (epcloud:missing, entry point of pytest_gpucloud.providers) "
            "failed to load: AttributeError*"
        ]
    )


# -- local --------------------------------------------------------------------------------


@pytest.fixture
def smi_path(tmp_path: Path) -> str:
    """A PATH with the stand-in nvidia-smi first."""
    folder = tmp_path / "smi-bin"
    folder.mkdir()
    shutil.copy2(STANDINS / "nvidia-smi", folder / "nvidia-smi")
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


def test_local_without_a_gpu_is_a_usage_error_saying_so(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, smi_path: str
) -> None:
    pytester.makepyfile(ONE_TEST)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    result = pytester.runpytest_inprocess("--gpu-cloud", "--gpu-provider", "local")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "no GPU on this machine: nvidia-smi is not on the PATH" in result.stderr.str()
    monkeypatch.setenv("PATH", smi_path)  # an nvidia-smi without a driver behind it
    result = pytester.runpytest_inprocess("--gpu-cloud", "--gpu-provider", "local")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "*--gpu-provider local found no GPU on this machine: nvidia-smi failed "
            "(NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.)"
        ]
    )


SLOT_TESTS = """
import fcntl
import os
import pathlib
import time

import pytest

FOLDER = pathlib.Path({folder!r})


@pytest.mark.gpu("T4")
@pytest.mark.parametrize("n", range(4))
def test_slot(n):
    slot = os.environ["CUDA_VISIBLE_DEVICES"]
    assert os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert "GPUCLOUD_API_KEY" not in os.environ
    with open(FOLDER / f"lock-{{slot}}", "w") as lock:
        # fails if another test holds this GPU slot right now
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        (FOLDER / f"ran-{{n}}-on-{{slot}}").touch()
        # the first tests of both slots meet: the run passes only if both GPUs work at once
        deadline = time.monotonic() + 60
        while len({{p.name.split("-on-")[1] for p in FOLDER.glob("ran-*")}}) < 2:
            assert time.monotonic() < deadline, "the other GPU never ran a test meanwhile"
            time.sleep(0.02)
"""


def test_local_fans_out_over_the_gpus_one_test_per_slot_at_a_time(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, smi_path: str
) -> None:
    folder = tmp_path / "slots"
    folder.mkdir()
    pytester.makepyfile(test_slots=SLOT_TESTS.format(folder=str(folder)))
    monkeypatch.setenv("PATH", smi_path)
    monkeypatch.setenv("STANDIN_NVIDIA_GPUS", standin_gpus("Tesla T4", "Tesla T4", "NVIDIA L4"))
    monkeypatch.setenv("GPUCLOUD_API_KEY", "not-for-the-tests")
    result = pytester.runpytest_inprocess("--gpu-cloud", "--gpu-provider", "local", "-n", "2")
    result.assert_outcomes(passed=4)
    ran = sorted(p.name for p in folder.glob("ran-*"))
    assert len(ran) == 4
    assert {name.split("-on-")[1] for name in ran} == {"0", "1"}  # never the L4 (slot 2)
    result.stdout.fnmatch_lines(["*T4 local-gpu* ready in *s; GPUs: 1 x Tesla T4 (15 GB)*"])


def test_local_with_more_workers_than_gpus_queues_tests_for_the_gpu(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, smi_path: str
) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.gpu()
        @pytest.mark.parametrize("n", range(6))
        def test_t(n):
            pass
        """
    )
    monkeypatch.setenv("PATH", smi_path)
    monkeypatch.setenv("STANDIN_NVIDIA_GPUS", standin_gpus("NVIDIA H200"))
    result = pytester.runpytest_inprocess("--gpu-cloud", "--gpu-provider", "local", "-n", "3")
    result.assert_outcomes(passed=6)
    # The workers asking while the one GPU is leased wait for it, rather than erroring.
    result.stdout.fnmatch_lines(
        [
            "*H200 (not created) dropped (no capacity for one more instance); tests wait for H200 "
            "local-gpu0*"
        ]
    )
    assert "infrastructure error" not in result.stdout.str()
    assert "(not created): gpu-cloud" not in result.stdout.str()  # not an error either


LINGERING_CHILD = """
import atexit
import os
import subprocess
import sys

import pytest


def _leave_a_child():
    # a process in a session of its own, holding the worker's output open after it ends
    subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(1.5)"], start_new_session=True
    )


if "CUDA_VISIBLE_DEVICES" in os.environ:  # on the worker only
    atexit.register(_leave_a_child)


@pytest.mark.gpu()
def test_a():
    pass
"""


def test_local_release_waits_for_the_output_of_what_the_lease_ran(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, smi_path: str
) -> None:
    """Like a worker killed with a GPU context, which holds its pipes open a while."""
    pytester.makepyfile(LINGERING_CHILD)
    monkeypatch.setenv("PATH", smi_path)
    monkeypatch.setenv("STANDIN_NVIDIA_GPUS", standin_gpus("NVIDIA H200"))
    result = pytester.runpytest_subprocess("--gpu-cloud", "--gpu-provider", "local")
    result.assert_outcomes(passed=1)
    output = result.stdout.str() + result.stderr.str()
    for noise in ("Task was destroyed", "Event loop is closed", "Traceback"):
        assert noise not in output


# -- ssh: the sim's SSH servers as static hosts --------------------------------------------


@dataclass
class Host:
    id: str
    port: int
    host_key: str
    home: Path


def _sim_host(sim: Sim, gpu: str, key: asyncssh.SSHKey) -> Host:
    """A sim instance created through the API, to serve as a static host."""
    with httpx.Client(base_url=sim.url, headers={"Authorization": f"Bearer {sim.api_key}"}) as http:
        created = http.post(
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
        while (answer := http.get(f"/v1/instances/{created['id']}").json())["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.02)
    home = next(i["home"] for i in sim.instances() if i["id"] == created["id"])
    return Host(created["id"], answer["ssh_port"], answer["ssh_host_key"], Path(home))


@pytest.fixture
def static_hosts(sim: Sim, tmp_path: Path) -> Any:
    """Two sim instances (T4, A100-80GB) as static hosts: key file, known_hosts, hosts."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    hosts = [_sim_host(sim, "T4", key), _sim_host(sim, "A100-80GB", key)]
    key_file = tmp_path / "id_test"
    key_file.write_bytes(key.export_private_key())
    key_file.chmod(0o600)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("".join(f"[127.0.0.1]:{h.port} {h.host_key}\n" for h in hosts))
    spec = f"gpu@127.0.0.1:{hosts[0].port}=T4,gpu@127.0.0.1:{hosts[1].port}=A100-80GB"
    # One word per option: pytest takes a separate path argument for a rootdir candidate.
    args = [f"--gpu-hosts={spec}", f"--gpu-known-hosts={known_hosts}", f"--gpu-ssh-key={key_file}"]
    yield hosts, args, known_hosts
    for host in hosts:
        sim.delete(host.id)


TWO_HOSTS_TESTS = """
import os
import pytest

@pytest.mark.gpu("T4")
def test_t4():
    assert os.environ["GPUCLOUD_SIM_GPU"] == "T4:1"

@pytest.mark.gpu("A100")
def test_a100():
    assert os.environ["GPUCLOUD_SIM_GPU"] == "A100-80GB:1"
"""


def test_ssh_hosts_are_leased_cleaned_and_never_deleted(
    sim: Sim, static_hosts: Any, pytester: pytest.Pytester
) -> None:
    hosts, args, _ = static_hosts
    pytester.makepyfile(TWO_HOSTS_TESTS)
    setup = ["--gpu-setup", "echo ran >> $HOME/setup-runs"]
    first = pytester.runpytest_inprocess("--gpu-cloud", "--gpu-provider", "ssh", *args, *setup)
    first.assert_outcomes(passed=2)
    first.stdout.fnmatch_lines(["*T4 ssh-127.0.0.1-* ready in *s; setup ran in *"])
    again = pytester.runpytest_inprocess("--gpu-cloud", "--gpu-provider", "ssh", *args, *setup)
    again.assert_outcomes(passed=2)
    again.stdout.fnmatch_lines(["*T4 ssh-127.0.0.1-* ready in *s; setup cached; GPUs: 1 x T4*"])
    for host in hosts:
        assert (host.home / "setup-runs").read_text() == "ran\n", "the setup ran once per host"
        assert list((host.home / "gpucloud").iterdir()) == [], "the workspace is removed"
    live = {i["id"] for i in sim.live()}
    assert {h.id for h in hosts} <= live
    paths = {f"/v1/instances/{h.id}" for h in hosts}
    assert not [r for r in sim.requests() if r["method"] == "DELETE" and r["path"] in paths]


def test_ssh_hosts_with_docker_remove_leftovers_then_container_and_workspace(
    sim: Sim, standins: Standins, static_hosts: Any, pytester: pytest.Pytester
) -> None:
    hosts, args, _ = static_hosts
    pytester.makepyfile(ONE_TEST)
    result = pytester.runpytest_inprocess(
        "--gpu-cloud", "--gpu-provider", "ssh", "--gpu-runtime", "docker", *args
    )
    result.assert_outcomes(passed=1)
    name = f"gpucloud-ssh-127.0.0.1-{hosts[0].port}"
    ws = f"{hosts[0].home}/gpucloud/{pytester.path.name}"
    calls = [c["argv"] for c in standins.calls("docker")]
    assert [c[:3] for c in calls[:4]] == [
        ["image", "inspect", "--format"],
        ["pull", "-q", "python:3.12-slim"],
        ["rm", "-f", name],  # one a session that ended badly may have left
        ["run", "-d", "--name"],
    ]
    assert calls[-2:] == [
        ["exec", "-i", "-w", ws, name, "sh", "-c", f"rm -rf {ws}"],
        ["rm", "-f", name],
    ]
    assert not (hosts[0].home / "gpucloud" / pytester.path.name).exists()
    assert not (hosts[0].home / "gpucloud" / f"{pytester.path.name}.manifest.json").exists()


def test_a_host_that_is_not_in_known_hosts_is_refused(
    sim: Sim, static_hosts: Any, pytester: pytest.Pytester
) -> None:
    _, args, known_hosts = static_hosts
    known_hosts.write_text("")
    pytester.makepyfile(ONE_TEST)
    result = pytester.runpytest_inprocess("--gpu-cloud", "--gpu-provider", "ssh", *args)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [f"*gpu-cloud: host gpu@127.0.0.1:* is not in {known_hosts} or presented another key*"]
    )


def test_a_leased_host_is_not_leased_again(static_hosts: Any, tmp_path: Path) -> None:
    hosts, args, known_hosts = static_hosts
    key = asyncssh.read_private_key(args[-1].split("=", 1)[1])
    host = StaticHost("gpu", "127.0.0.1", hosts[0].port, "T4", 1)
    offer = Offer(GpuType("T4", 16, 0.0, True, ("static",)), "static")
    create: dict[str, Any] = {
        "count": 1,
        "image": "x",
        "ssh_public_key": "",
        "labels": {},
        "max_lifetime_s": 60,
        "client_token": "",
    }

    async def scenario() -> str:
        first = SshProvider([host], known_hosts=known_hosts, client_key=key, lease_timeout=0.5)
        second = SshProvider([host], known_hosts=known_hosts, client_key=key, lease_timeout=0.5)
        await first.create(offer, **create)
        try:
            with pytest.raises(OutOfCapacity) as other:
                await second.create(offer, **create)
            with pytest.raises(OutOfCapacity) as same:
                await first.create(offer, **create)
        finally:
            await first.aclose()
        leased = await second.create(offer, **create)  # free again
        await second.aclose()
        assert leased.id == host.instance_id
        return f"{other.value} | {same.value}"

    assert asyncio.run(scenario()) == (
        "gpu-cloud: the 1 host(s) with 1 x T4: still leased by other sessions after 0.5 s | "
        "gpu-cloud: the 1 host(s) with 1 x T4: all leased by this session already "
        "(one per kind of instance)"
    )


def test_parse_hosts() -> None:
    assert parse_hosts("gpu@10.0.0.5:2222=A100-80GB:2, me@box=L4,root@[::1]:22=T4") == [
        StaticHost("gpu", "10.0.0.5", 2222, "A100-80GB", 2),
        StaticHost("me", "box", 22, "L4", 1),
        StaticHost("root", "::1", 22, "T4", 1),
    ]
    assert StaticHost("root", "::1", 22, "T4", 1).address == "root@[::1]:22"
    for bad, why in [
        ("10.0.0.5=T4", "'10.0.0.5=T4' is not user@host[:port]=TYPE[:COUNT]"),
        ("gpu@box", "'gpu@box' is not user@host[:port]=TYPE[:COUNT]"),
        ("gpu@box:99999=T4", "'gpu@box:99999=T4': port 1-65535 and a GPU count of at least 1"),
        ("a@b=T4,a@b:22=L4", "a@b:22 is named twice"),
    ]:
        with pytest.raises(ValueError, match=f"^{re.escape(why)}$"):
            parse_hosts(bad)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--gpu-hosts", "gpu@box=T4;gpu@other=L4"], "*--gpu-hosts 'gpu@box=T4;gpu@other=L4'*"),
        ([], "*--gpu-provider ssh needs its hosts: --gpu-hosts user@host*=TYPE*"),
        (
            ["--gpu-hosts", "gpu@box=T4", "--gpu-known-hosts", "/nonexistent/known"],
            "*reads the hosts' keys from /nonexistent/known, which cannot be read*",
        ),
    ],
)
def test_bad_ssh_settings_are_usage_errors(
    pytester: pytest.Pytester, args: list[str], expected: str
) -> None:
    pytester.makepyfile(ONE_TEST)
    result = pytester.runpytest_inprocess("--gpu-cloud", "--gpu-provider", "ssh", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([expected])
    assert "Traceback" not in result.stderr.str()
