"""Providers: the registry (hook, entry points), ``local`` (this machine's GPUs) and ``ssh``
(static hosts; here the simulated cloud's SSH servers, used as such).

No GPU is here: the ``local`` provider's slots are tested with a stand-in nvidia-smi
(tests/standins) that lists made-up GPUs.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from pytest_gpucloud.cli import cleanup
from pytest_gpucloud.core.addresses import StaticHost, parse_hosts
from pytest_gpucloud.core.catalog import GpuType, Offer
from pytest_gpucloud.core.errors import OutOfCapacity
from pytest_gpucloud.machine.workspaces import workspace_key
from pytest_gpucloud.providers.local import LocalProvider
from pytest_gpucloud.providers.static_hosts import SshProvider
from pytest_gpucloud.remote.workspaces import WORKSPACES
from tests.cloud import STANDINS, GpuRun, Sim, SimHost, Standins, standin_gpus

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


def test_local_keeps_a_warm_workspace_per_slot_and_cleanup_removes_it(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    smi_path: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temp"))
    (tmp_path / "temp").mkdir()
    monkeypatch.setenv("PATH", smi_path)
    monkeypatch.setenv("STANDIN_NVIDIA_GPUS", standin_gpus("Tesla T4"))
    pytester.makepyfile(ONE_TEST)
    inodes = []
    for _ in range(2):
        result = pytester.runpytest_inprocess("--gpu-cloud", "--gpu-provider", "local")
        result.assert_outcomes(passed=1)
        [home] = LocalProvider.slot_homes()
        inodes.append(next(_workspace(home, pytester.path).glob("test_*.py")).stat().st_ino)
    assert inodes[0] == inodes[1], "the second sync rewrote an unchanged file"
    assert home.stat().st_mode & 0o777 == 0o700
    capsys.readouterr()
    monkeypatch.setenv("GPUCLOUD_PROVIDER", "local")
    assert cleanup.main(["--yes"], cwd=pytester.path) == 0
    said = capsys.readouterr().out
    assert f"{home}  {workspace_key(pytester.path)}  idle 0.0 h" in said
    assert f"{home}: removed" in said
    assert not _workspace(home, pytester.path).exists()


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


@pytest.fixture
def static_hosts(sim: Sim, tmp_path: Path) -> Any:
    """Two sim instances (T4, A100-80GB) as static hosts: key file, known_hosts, hosts."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    hosts = [sim.static_host("T4", key), sim.static_host("A100-80GB", key)]
    args, known_hosts = _host_options(hosts, key, tmp_path)
    yield hosts, args, known_hosts
    for host in hosts:
        sim.delete(host.id)


def _host_options(
    hosts: list[SimHost], key: asyncssh.SSHKey, tmp_path: Path
) -> tuple[list[str], Path]:
    """The options that make ``hosts`` the ``ssh`` provider's, and the known_hosts file."""
    key_file = tmp_path / "id_test"
    key_file.write_bytes(key.export_private_key())
    key_file.chmod(0o600)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("".join(f"[127.0.0.1]:{h.port} {h.host_key}\n" for h in hosts))
    spec = ",".join(f"gpu@127.0.0.1:{h.port}={h.gpu}" for h in hosts)
    # One word per option: pytest takes a separate path argument for a rootdir candidate.
    args = [f"--gpu-hosts={spec}", f"--gpu-known-hosts={known_hosts}", f"--gpu-ssh-key={key_file}"]
    return args, known_hosts


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


def _workspace(home: Path, rootdir: Path) -> Path:
    return home / WORKSPACES / workspace_key(rootdir)


def test_ssh_hosts_are_leased_never_deleted_and_keep_a_warm_workspace(
    sim: Sim, static_hosts: Any, pytester: pytest.Pytester
) -> None:
    hosts, args, _ = static_hosts
    pytester.makepyfile(TWO_HOSTS_TESTS)
    setup = ["--gpu-setup", "echo ran >> $HOME/setup-runs"]
    first = pytester.runpytest_inprocess("--gpu-cloud", "--gpu-provider", "ssh", *args, *setup)
    first.assert_outcomes(passed=2)
    first.stdout.fnmatch_lines(["*T4 ssh-127.0.0.1-* ready in *s; setup ran in *"])
    synced = next(_workspace(hosts[0].home, pytester.path).glob("test_*.py"))
    inode = synced.stat().st_ino
    again = pytester.runpytest_inprocess("--gpu-cloud", "--gpu-provider", "ssh", *args, *setup)
    again.assert_outcomes(passed=2)
    again.stdout.fnmatch_lines(["*T4 ssh-127.0.0.1-* ready in *s; setup cached; GPUs: 1 x T4*"])
    assert synced.stat().st_ino == inode, "the second sync rewrote an unchanged file"
    for host in hosts:
        assert (host.home / "setup-runs").read_text() == "ran\n", "the setup ran once per host"
        workspaces = host.home / WORKSPACES
        assert [p.name for p in workspaces.iterdir() if p.is_dir()] == [
            workspace_key(pytester.path)
        ], "one warm workspace, kept"
        assert workspaces.stat().st_mode & 0o777 == 0o700
    live = {i["id"] for i in sim.live()}
    assert {h.id for h in hosts} <= live
    paths = {f"/v1/instances/{h.id}" for h in hosts}
    assert not [r for r in sim.requests() if r["method"] == "DELETE" and r["path"] in paths]


def _commands(sim: Sim, host: SimHost) -> list[str]:
    return [c["command"] for i in sim.instances() if i["id"] == host.id for c in i["commands"]]


def test_a_session_on_a_static_host_opens_one_remote_command(
    sim: Sim, static_hosts: Any, pytester: pytest.Pytester
) -> None:
    """The lease, the sync, the setup, the worker and the artifacts' pull run through the
    hub: the login shell paid once."""
    hosts, args, _ = static_hosts
    pytester.makepyfile(
        TWO_HOSTS_TESTS
        + '\n@pytest.mark.gpu("T4")\ndef test_keeps(gpu_artifacts):\n'
        + '    (gpu_artifacts / "kept.txt").write_text("kept")\n'
    )
    setup = ["--gpu-setup", "echo set up"]
    for session in (1, 2):
        result = pytester.runpytest_inprocess("--gpu-cloud", "--gpu-provider", "ssh", *args, *setup)
        result.assert_outcomes(passed=3)
        assert [p.read_text() for p in pytester.path.glob(".gpucloud/artifacts/*/*/kept.txt")]
        for host in hosts:
            commands = _commands(sim, host)
            assert len(commands) == session, commands
            assert "class Hub:" in commands[-1]


def test_a_static_host_that_forwards_to_no_socket_gets_an_exec_per_command(
    sim: Sim, pytester: pytest.Pytester, tmp_path: Path
) -> None:
    sim.fault(kind="no_socket_forwarding")
    key = asyncssh.generate_private_key("ssh-ed25519")
    host = sim.static_host("T4", key)
    args, _ = _host_options([host], key, tmp_path)
    pytester.makepyfile(ONE_TEST)
    try:
        result = pytester.runpytest_inprocess("--gpu-cloud", "--gpu-provider", "ssh", *args)
    finally:
        sim.delete(host.id)
    result.assert_outcomes(passed=1)
    kinds = ["Warm workspaces", "Receiving end", "gpucloud_remote"]
    commands = _commands(sim, host)
    assert [next(k for k in kinds if k in c) for c in commands] == kinds
    assert "class Hub:" in commands[0], "the lease's holder became a hub that cannot serve"


def test_a_workspace_is_never_shared_between_projects_of_one_name(tmp_path: Path) -> None:
    one, two = tmp_path / "a" / "proj", tmp_path / "b" / "proj"
    one.mkdir(parents=True)
    two.mkdir(parents=True)
    assert workspace_key(one) != workspace_key(two)
    assert workspace_key(one) == workspace_key(tmp_path / "a" / "." / "proj")
    assert workspace_key(one).startswith("proj-")


def test_idle_workspaces_are_swept_when_a_host_is_leased(
    static_hosts: Any, pytester: pytest.Pytester
) -> None:
    hosts, args, _ = static_hosts
    workspaces = hosts[0].home / WORKSPACES
    stale, fresh = workspaces / "old-0123456789abcdef", workspaces / "new-0123456789abcdef"
    for folder in (stale, fresh):
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "f.txt").write_text("x")
        Path(f"{folder}.manifest.json").write_text("{}")
    day_ago = time.time() - 86400
    os.utime(f"{stale}.manifest.json", (day_ago, day_ago))
    workspaces.parent.chmod(0o700)
    workspaces.chmod(0o700)
    pytester.makepyfile(ONE_TEST)
    ttl = "--gpu-workspace-ttl=12h"
    pytester.runpytest_inprocess(
        "--gpu-cloud", "--gpu-provider", "ssh", *args, ttl
    ).assert_outcomes(passed=1)
    assert not stale.exists()
    assert not Path(f"{stale}.manifest.json").exists()
    assert (fresh / "sub" / "f.txt").exists()


@pytest.mark.parametrize("attack", ["symlink", "writable"])
def test_a_host_whose_workspace_folder_is_not_private_is_refused(
    static_hosts: Any, pytester: pytest.Pytester, tmp_path: Path, attack: str
) -> None:
    hosts, args, _ = static_hosts
    base = hosts[0].home / WORKSPACES
    if attack == "symlink":
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir(mode=0o700)
        base.parent.mkdir(parents=True, mode=0o700)
        base.symlink_to(elsewhere)
        why = "is not a folder but a link or a file"
    else:
        base.mkdir(parents=True)
        base.chmod(0o777)
        why = "is writable by other users (mode 777; chmod 700 it)"
    pytester.makepyfile(ONE_TEST)
    result = pytester.runpytest_inprocess("--gpu-cloud", "--gpu-provider", "ssh", *args)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [f"*gpu-cloud: could not lease host gpu@127.0.0.1:*: {base} {why}*"]
    )
    assert not list(Path(base).iterdir())


def test_cleanup_lists_and_removes_the_warm_workspaces_of_the_hosts(
    static_hosts: Any,
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    hosts, args, _ = static_hosts
    pytester.makepyfile(ONE_TEST)
    pytester.runpytest_inprocess("--gpu-cloud", "--gpu-provider", "ssh", *args).assert_outcomes(
        passed=1
    )
    workspace = _workspace(hosts[0].home, pytester.path)
    assert workspace.is_dir()
    capsys.readouterr()
    monkeypatch.setenv("GPUCLOUD_PROVIDER", "ssh")
    for arg in args:
        name, value = arg.removeprefix("--gpu-").split("=", 1)
        monkeypatch.setenv("GPUCLOUD_" + name.upper().replace("-", "_"), value)
    monkeypatch.setattr("builtins.input", lambda _: "n")
    assert cleanup.main([], cwd=pytester.path) == 0
    listed = capsys.readouterr().out
    assert f"gpu@127.0.0.1:{hosts[0].port}  {workspace.name}  idle 0.0 h" in listed
    assert workspace.is_dir()
    assert cleanup.main(["--yes"], cwd=pytester.path) == 0
    assert f"gpu@127.0.0.1:{hosts[0].port}: removed" in capsys.readouterr().out
    assert not workspace.exists()
    assert cleanup.main(["--yes"], cwd=pytester.path) == 0
    assert "no warm workspaces" in capsys.readouterr().out


def test_ssh_hosts_with_docker_remove_leftovers_then_the_container_and_keep_the_workspace(
    sim: Sim, standins: Standins, static_hosts: Any, pytester: pytest.Pytester
) -> None:
    hosts, args, _ = static_hosts
    pytester.makepyfile(ONE_TEST)
    result = pytester.runpytest_inprocess(
        "--gpu-cloud", "--gpu-provider", "ssh", "--gpu-runtime", "docker", *args
    )
    result.assert_outcomes(passed=1)
    name = f"gpucloud-ssh-127.0.0.1-{hosts[0].port}"
    calls = [c["argv"] for c in standins.calls("docker")]
    assert [c[:3] for c in calls[:4]] == [
        ["image", "inspect", "--format"],
        ["pull", "-q", "python:3.12-slim"],
        ["rm", "-f", name],  # one a session that ended badly may have left
        ["run", "-d", "--name"],
    ]
    assert calls[-1] == ["rm", "-f", name]
    assert list(_workspace(hosts[0].home, pytester.path).glob("test_*.py"))


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
