"""End-to-end under pytest-xdist: workers own the items, the controller owns the fleet.

The tests on sim instances are processes on this machine, so they can meet each other
(a barrier in a shared folder) and find a local xdist worker's pid.
"""

from __future__ import annotations

import json
import os
import re
import stat
from datetime import datetime
from pathlib import Path

import pytest

from pytest_gpucloud.core.engine import Engine
from pytest_gpucloud.core.errors import ProviderError
from pytest_gpucloud.core.request import GpuRequest
from pytest_gpucloud.desk.ipc import IpcClient, IpcServer
from pytest_gpucloud.desk.service import FleetService
from pytest_gpucloud.scheduling.fleet import Fleet
from tests.cloud import GpuRun, Sim
from tests.test_e2e_core import INI, _junit, _summary

# Each module's first test waits until the other module's first test runs too: the run
# can pass only if two instances work at the same time.
BARRIER = """
import os
import time

def meet(folder, name):
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, name), "w").close()
    deadline = time.monotonic() + 60
    while len(os.listdir(folder)) < 2:
        assert time.monotonic() < deadline, "the other module's gpu test never ran meanwhile"
        time.sleep(0.02)
"""

T4_TESTS = """
import pytest
from barrier import meet

pytestmark = pytest.mark.gpu("T4")
SETUPS = []


@pytest.fixture(scope="module")
def expensive():
    SETUPS.append(1)
    return len(SETUPS)


def test_t4_meets(expensive):
    meet({folder!r}, "t4")


def test_t4_fails(expensive):
    assert SETUPS == [1], "the module fixture was set up again"
    assert 2 + 2 == 5
"""

L4_TESTS = """
import pytest
from barrier import meet

pytestmark = pytest.mark.gpu("L4")


def test_l4_meets():
    meet({folder!r}, "l4")


def test_l4_skips():
    pytest.skip("not today")
"""


VERBOSE_LINE = re.compile(r"\[gw\d+\] \[ *\d+%\] (\w+) (?:\[[^]]*\] )?(\S+)")


def _this_session(sim: Sim, before: int) -> list[dict[str, object]]:
    return sim.instances()[before:]


def _at(value: object) -> datetime:
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def test_two_workers_run_gpu_tests_on_two_instances_at_once(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester
) -> None:
    pytester.makeini(INI)
    folder = str(pytester.path / "met")
    pytester.makepyfile(
        barrier=BARRIER,
        test_t4=T4_TESTS.format(folder=folder),
        test_l4=L4_TESTS.format(folder=folder),
    )
    before = len(sim.instances())
    remote = gpu_run("-n", "2", "--dist", "loadfile", "-rA", "--junitxml=remote.xml")
    instances = _this_session(sim, before)
    # --lf: the controller's cache saw the replayed failure.
    again = gpu_run("-n", "2", "--lf")
    assert again.parseoutcomes() == {"failed": 1}
    again.stdout.fnmatch_lines(["*2 workers [[]1 item[]]*"])
    local = pytester.runpytest_inprocess(
        "-p", "no:gpucloud", "-n", "2", "--dist", "loadfile", "-rA", "--junitxml=local.xml"
    )
    expected = {"failed": 1, "passed": 2, "skipped": 1}
    assert remote.parseoutcomes() == expected
    assert local.parseoutcomes() == expected
    assert _summary(remote.outlines) == _summary(local.outlines)
    assert _junit(pytester.path / "remote.xml") == _junit(pytester.path / "local.xml")
    remote.stdout.fnmatch_lines(["*test_t4.py:*: AssertionError"])
    # Each worker's two tests ran on one instance (the fixture above was set up once).
    lines = (re.match(r"i-\S+ +(\S+) .* (\d+) tests ", line) for line in remote.outlines)
    assert sorted(m.groups() for m in lines if m and m[2] != "0") == [("L4", "2"), ("T4", "2")]

    assert {str(i["gpu_type"]) for i in instances} == {"L4", "T4"}
    assert all(i["status"] == "terminated" for i in instances)
    # An L4 and a T4 instance were up at once: each came up before the other was deleted.
    assert any(
        _at(a["running_at"]) < _at(b["deleted_at"]) and _at(b["running_at"]) < _at(a["deleted_at"])
        for a in instances
        if a["gpu_type"] == "L4"
        for b in instances
        if b["gpu_type"] == "T4"
    )


def test_loadgroup_reports_as_a_local_run_does(gpu_run: GpuRun, pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(
        """
        import pytest

        pytestmark = [pytest.mark.gpu("T4"), pytest.mark.xdist_group("gpu")]

        def test_one():
            pass

        def test_two():
            assert 0
        """
    )
    remote = gpu_run("-n", "2", "--dist", "loadgroup", "-v")
    local = pytester.runpytest_inprocess(
        "-p", "no:gpucloud", "-n", "2", "--dist", "loadgroup", "-v"
    )

    def verdicts(result: pytest.RunResult) -> list[str]:
        # "[gw0] [ 50%] PASSED [T4 i-3f2a] test_x.py::test_one": the verdict and the nodeid
        found = (VERBOSE_LINE.match(line) for line in result.outlines)
        return sorted(f"{match[1]} {match[2]}" for match in found if match)

    assert verdicts(remote) == verdicts(local)
    assert len(verdicts(remote)) == 2


def test_workers_get_the_socket_but_never_the_api_key(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile(
        f"""
        import json
        import os
        import stat

        import pytest

        from pytest_gpucloud.plugin import SETTINGS_KEY


        @pytest.mark.gpu("T4")
        def test_remote():
            pass


        def test_local_worker(request, gpu_cloud):
            config = request.config
            settings = config.stash[SETTINGS_KEY]
            handoff = config.workerinput["gpucloud_fleet"]
            with open("/proc/self/environ", "rb") as environ:
                initial = environ.read()
            with open({str(pytester.path / "seen.json")!r}, "w") as seen:
                json.dump(
                    {{
                        "workerinput": config.workerinput,
                        "instances": [i.gpu for i in gpu_cloud.instances],
                        "settings": settings.model_dump(mode="json"),
                        "environ": dict(os.environ),
                        "initial_environ": initial.decode(errors="replace"),
                        "socket_mode": stat.S_IMODE(os.stat(handoff["socket"]).st_mode),
                        "folder_mode": stat.S_IMODE(
                            os.stat(os.path.dirname(handoff["socket"])).st_mode
                        ),
                    }},
                    seen,
                )
        """
    )
    if not Path("/proc/self/environ").exists():
        pytest.skip("needs /proc to read a process's initial environment")
    result = gpu_run("-n", "2", "--dist", "loadfile")
    result.assert_outcomes(passed=2)
    seen_text = (pytester.path / "seen.json").read_text()
    seen = json.loads(seen_text)
    assert sim.api_key not in seen_text
    assert "GPUCLOUD_API_KEY" not in seen["environ"]
    assert "GPUCLOUD_API_KEY" not in seen["initial_environ"]
    assert seen["settings"]["api_key"] is None
    assert sorted(seen["workerinput"]["gpucloud_fleet"]) == ["provider", "socket", "token"]
    assert seen["socket_mode"] == 0o600
    assert seen["folder_mode"] == 0o700
    # The gpu_cloud fixture of a worker shows the controller's fleet.
    assert seen["instances"] == ["T4"]
    # The controller had it all along, and has it back in its environment.
    assert os.environ["GPUCLOUD_API_KEY"] == sim.api_key


def test_a_worker_killed_mid_test_leaves_no_instance(
    gpu_run: GpuRun, sim: Sim, pytester: pytest.Pytester
) -> None:
    pidfile = str(pytester.path / "worker.pid")
    pytester.makeconftest(
        f"""
        import os

        import pytest


        @pytest.hookimpl(wrapper=True)
        def pytest_runtest_protocol(item):
            # Only in the local xdist worker, not in the session on the instance.
            if "PYTEST_XDIST_WORKER" in os.environ and item.name == "test_dies":
                with open({pidfile!r}, "w") as pidfile:
                    pidfile.write(str(os.getpid()))
            return (yield)
        """
    )
    pytester.makepyfile(
        test_crash=f"""
        import os
        import signal
        import time

        import pytest


        @pytest.mark.gpu("T4")
        def test_dies():
            with open({pidfile!r}) as pidfile:
                os.kill(int(pidfile.read()), signal.SIGKILL)
            time.sleep(600)
        """,
        test_other="""
        import pytest


        @pytest.mark.gpu("T4")
        def test_survives():
            pass
        """,
    )
    before = len(sim.instances())
    result = gpu_run.subprocess("-n", "2", timeout=120)
    result.stdout.fnmatch_lines(["*worker 'gw*' crashed while running 'test_crash.py::test_dies'*"])
    result.assert_outcomes(passed=1, failed=1)
    instances = _this_session(sim, before)
    assert instances, "the session made no instance"
    assert [i["id"] for i in instances if i["status"] != "terminated"] == []


async def _refuse_to_start() -> Fleet:
    raise ProviderError("no cloud today")


def test_the_socket_is_private_and_wants_the_token() -> None:
    engine = Engine()
    server = IpcServer(FleetService(_refuse_to_start), "sim")
    try:
        engine.run(server.start(), timeout=10)
        path = server.handoff["socket"]
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        request = GpuRequest(types=("T4",), mode="one")

        stranger = IpcClient({**server.handoff, "token": "0" * 64}, owner="gw9")
        refused = stranger.run("test_a.py::test_a", request, None)
        assert refused.error == "gpu-cloud: the xdist controller closed the fleet's socket"

        worker = IpcClient(server.handoff, owner="gw0")
        answered = worker.run("test_a.py::test_a", request, None)
        assert answered.error == "gpu-cloud: no cloud today"
        with pytest.raises(Exception, match="no cloud today"):
            worker.plan([("test_a.py::test_a", request)])
        worker.close()
    finally:
        engine.run(server.close(), timeout=10)
        engine.close()
    assert not os.path.exists(os.path.dirname(server.handoff["socket"]))
