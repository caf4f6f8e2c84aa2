"""``gpu_cloud.instance(spec)``: a local test leases an instance of the fleet, runs commands,
copies files both ways and calls Python there; the instance goes when the block ends."""

from __future__ import annotations

import pytest

from tests.cloud import GpuRun, Sim

LOCAL_TEST = """
import os
import pathlib

import numpy as np
import pytest

from pytest_gpucloud.features.instance_handle import RemoteCallError


def scaled(values, factor):
    return np.asarray(values) * factor


def where_am_i():
    return os.environ.get("GPUCLOUD_SIM_INSTANCE"), os.getcwd()


def fails():
    def inner():
        raise ValueError("bad value on the GPU")
    inner()


def raises_unpicklable():
    import threading

    error = RuntimeError("cannot travel back")
    error.lock = threading.Lock()
    raise error


def test_drive_an_instance(gpu_cloud, tmp_path):
    with gpu_cloud.instance("T4") as gpu:
        assert gpu.id.startswith("i-")
        [view] = [v for v in gpu_cloud.instances if v.id == gpu.id]
        assert view.gpu == "T4"

        done = gpu.run("echo out; echo err >&2; exit 3")
        assert (done.stdout, done.stderr, done.exit_code) == ("out\\n", "err\\n", 3)
        assert gpu.run("cat data.txt").stdout == "synced\\n"  # the workspace is synced

        (tmp_path / "up").mkdir()
        (tmp_path / "up" / "a.txt").write_text("alpha")
        (tmp_path / "up" / "deep").mkdir()
        (tmp_path / "up" / "deep" / "b.bin").write_bytes(bytes(range(256)))
        gpu.put(tmp_path / "up", "uploaded")
        gpu.put(tmp_path / "up" / "a.txt", "single/renamed.txt")
        assert gpu.run("cat uploaded/a.txt single/renamed.txt").stdout == "alphaalpha"
        gpu.run("mkdir -p made && echo remote > made/r.txt && echo one > made/one.txt")
        gpu.get("made", tmp_path / "down")
        gpu.get("made/one.txt", tmp_path / "one.txt")
        gpu.get("uploaded/deep/b.bin", tmp_path / "b.bin")
        assert (tmp_path / "down" / "r.txt").read_text() == "remote\\n"
        assert (tmp_path / "one.txt").read_text() == "one\\n"
        assert (tmp_path / "b.bin").read_bytes() == bytes(range(256))
        with pytest.raises(FileNotFoundError, match="nope"):
            gpu.get("nope", tmp_path / "nope")
        # a large copy, and the connection still serves commands after it
        assert gpu.run("head -c 4000000 /dev/urandom > big.bin").exit_code == 0
        gpu.get("big.bin", tmp_path / "big.bin")
        assert (tmp_path / "big.bin").stat().st_size == 4_000_000
        assert gpu.run("echo still here").stdout == "still here\\n"

        result = gpu.call(scaled, [1, 2, 3], factor=2.5)
        assert isinstance(result, np.ndarray)
        assert result.tolist() == [2.5, 5.0, 7.5]
        instance, cwd = gpu.call(where_am_i)
        assert instance == gpu.id and cwd == gpu.workspace
        assert gpu.call(lambda: sum(range(10))) == 45

        with pytest.raises(ValueError, match="bad value on the GPU") as caught:
            gpu.call(fails)
        assert "remote traceback" in str(caught.value)
        # the source line shows where the instance can read the test's file (a sim's can)
        remote_traceback = str(caught.value).rstrip()
        assert ", in inner\\n" in remote_traceback
        assert remote_traceback.endswith("\\nValueError: bad value on the GPU")
        with pytest.raises(RemoteCallError, match="RuntimeError: cannot travel back"):
            gpu.call(raises_unpicklable)
        leased = gpu.id
    assert [v.state for v in gpu_cloud.instances if v.id == leased] == ["released"]
"""


def test_a_local_test_drives_its_own_instance(
    gpu_run: GpuRun, pytester: pytest.Pytester, sim: Sim
) -> None:
    pytester.makepyfile(test_local=LOCAL_TEST)
    (pytester.path / "data.txt").write_text("synced\n")
    before = {i["id"] for i in sim.instances()}
    # A process of its own: cloudpickle must not see the state that earlier in-process
    # sessions of this suite leave behind (it hit the recursion limit there).
    result = gpu_run.subprocess()
    result.assert_outcomes(passed=1)
    [instance] = [i for i in sim.instances() if i["id"] not in before]
    assert instance["status"] == "terminated"
    # the cost report counts it like any other instance, held by a handle, not by tests
    result.stdout.fnmatch_lines([f"{instance['id']}   T4 * leased *", "total: 1 instance(s)*"])


def test_xdist_workers_drive_instances_of_their_own(
    gpu_run: GpuRun, pytester: pytest.Pytester, sim: Sim
) -> None:
    # The same test in a worker, and another beside it: the controller leases, runs and
    # copies for them over the fleet's socket; the worker's test sees no difference.
    pytester.makepyfile(
        test_local=LOCAL_TEST,
        test_other="""
        def test_other(gpu_cloud):
            with gpu_cloud.instance("T4") as gpu:
                assert gpu.run("echo beside").stdout == "beside\\n"
                assert gpu.call(len, "four") == 4
        """,
    )
    (pytester.path / "data.txt").write_text("synced\n")
    before = {i["id"] for i in sim.instances()}
    result = gpu_run.subprocess("-n", "2")
    result.assert_outcomes(passed=2)
    leased = [i for i in sim.instances() if i["id"] not in before]
    assert len(leased) == 2
    assert {i["status"] for i in leased} == {"terminated"}
    result.stdout.fnmatch_lines(["total: 2 instance(s)*"])


def test_a_crashed_workers_lease_is_released_at_once(
    gpu_run: GpuRun, pytester: pytest.Pytester
) -> None:
    # The replacement worker's test sees the crashed one's instance go, long before the
    # session ends (when the fleet would delete it anyway).
    pytester.makepyfile(
        """
        import os
        import pathlib
        import time

        def test_a_crash(gpu_cloud):
            with gpu_cloud.instance("T4") as gpu:
                pathlib.Path("leased.txt").write_text(gpu.id)
                os._exit(3)

        def test_b_sees_it_released(gpu_cloud):
            leased = pathlib.Path("leased.txt").read_text()
            deadline = time.monotonic() + 30
            while (states := [v.state for v in gpu_cloud.instances if v.id == leased]) != [
                "released"
            ]:
                assert time.monotonic() < deadline, states
                time.sleep(0.1)
        """
    )
    result = gpu_run.subprocess("-n", "1")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*crashed while running*test_a_crash*"])


def test_spec_errors_are_errors_of_the_test(gpu_run: GpuRun, pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_bad(gpu_cloud):
            with gpu_cloud.instance("NOPE-GPU"):
                pass
        """
    )
    result = gpu_run()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*gpu-cloud: *NOPE-GPU*"])
