"""End-to-end: the plugins people run beside this one, on the simulated cloud.

Each project marks every test ``gpu("T4")`` from its conftest only under ``--gpu-cloud``, so
the same files run locally (no option) and remotely (the option), and each remote run is
held against the local one.
"""

from __future__ import annotations

import re
import select
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.cloud import GpuRun, Sim

MARK_ALL = """
import pytest


def pytest_collection_modifyitems(config, items):
    if config.getoption("--gpu-cloud"):
        for item in items:
            item.add_marker(pytest.mark.gpu("T4"))
"""
# What the inner sessions get besides (see tests/conftest.py), less -p no:randomly.
ASYNCIO_SCOPE = "-o asyncio_default_fixture_loop_scope=function"


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(MARK_ALL)
    return pytester


def both(
    project: pytest.Pytester, gpu_run: GpuRun, *args: str
) -> tuple[pytest.RunResult, pytest.RunResult]:
    """The same session locally, then with every test on the simulated cloud."""
    local = project.runpytest_inprocess(*args)
    remote = gpu_run(*args)
    return local, remote


def remote_ran(result: pytest.RunResult, count: int) -> None:
    """The tests did run on instances (the cost summary counts them), and no warning came."""
    out = result.stdout.str()
    assert sum(int(n) for n in re.findall(r"i-\w+ +T4 .* (\d+) tests? ", out)) == count, out
    assert "warnings summary" not in out, out


def test_timeout_stops_a_hanging_remote_test_as_locally(
    project: pytest.Pytester, gpu_run: GpuRun
) -> None:
    project.makepyfile(
        test_hang="""
        import time
        import pytest

        @pytest.mark.timeout(1.5)
        def test_marked():
            time.sleep(60)

        def test_by_option():
            time.sleep(60)

        def test_after():
            pass
        """
    )
    local, remote = both(project, gpu_run, "--timeout=1", "-rf")
    for result in (local, remote):
        result.assert_outcomes(failed=2, passed=1)
        result.stdout.fnmatch_lines(
            [
                "FAILED test_hang.py::test_marked - Failed: Timeout (>1.5s)*",
                "FAILED test_hang.py::test_by_option - Failed: Timeout (>1.0s)*",
            ]
        )
    assert "INTERNALERROR" not in remote.stdout.str()
    remote_ran(remote, 3)


def test_a_plugin_missing_on_the_instance_is_named(
    project: pytest.Pytester, gpu_run: GpuRun, sim: Sim, tmp_path: Path
) -> None:
    # An image without pytest-timeout: the instances' python3 runs pytest with it blocked.
    bin_dir = tmp_path / "image-bin"
    bin_dir.mkdir()
    python3 = bin_dir / "python3"
    python3.write_text(f"#!/bin/sh\nPYTEST_ADDOPTS='-p no:timeout' exec {sys.executable} \"$@\"\n")
    python3.chmod(0o755)
    project.makepyfile(test_one="def test_one():\n    pass\n")
    sim.configure(extra_path=str(bin_dir))
    try:
        result = gpu_run("--timeout=5")
    finally:
        sim.configure(extra_path=None)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "gpu-cloud: the remote worker on instance i-* stopped while collecting: remote pytest "
            "could not start: --timeout=5.0 needs pytest-timeout on the instance, as here; "
            "install it in the image or with --gpu-setup"
        ]
    )


def test_reruns_and_flaky_marker_rerun_remote_tests(
    project: pytest.Pytester, gpu_run: GpuRun
) -> None:
    project.makepyfile(
        test_flaky="""
        import pytest

        ATTEMPTS = []

        def test_second_time_lucky():
            ATTEMPTS.append(1)
            assert len(ATTEMPTS) >= 2

        @pytest.mark.flaky(reruns=3)
        def test_never():
            assert False, "always"

        def test_fine():
            pass
        """
    )
    args = ("--reruns=1", "-v", "-rR")
    local = project.runpytest_inprocess(*args, "--junitxml=local.xml")
    remote = gpu_run(*args, "--junitxml=remote.xml")
    assert (
        local.parseoutcomes()
        == remote.parseoutcomes()
        == {
            "failed": 1,
            "passed": 2,
            "rerun": 4,
        }
    )
    for result in (local, remote):
        result.stdout.fnmatch_lines(
            ["*test_second_time_lucky RERUN*", "*test_second_time_lucky PASSED*"]
        )
        result.stdout.fnmatch_lines(
            ["*rerun test summary info*", "RERUN test_flaky.py::test_never"]
        )
    remote_ran(remote, 3)
    # junitxml: the same test cases, in the same order, with the same results.
    cases = _junit_cases(project.path / "remote.xml")
    assert cases == _junit_cases(project.path / "local.xml")
    assert any(name == "test_never" and "failure" in tags for name, tags in cases), cases
    # --fail-on-flaky: a test that passed on a rerun fails the session, here as there.
    flaky = ("--reruns=1", "--fail-on-flaky", "-k", "lucky")
    assert project.runpytest_inprocess(*flaky).ret == gpu_run(*flaky).ret == 7


def _junit_cases(path: Path) -> list[tuple[str, list[str]]]:
    cases = ET.parse(path).getroot().iter("testcase")
    return [(case.attrib["name"], sorted(child.tag for child in case)) for case in cases]


@pytest.fixture
def randomly(monkeypatch: pytest.MonkeyPatch) -> None:
    """pytest-randomly on, as a user has it once installed."""
    monkeypatch.setenv("PYTEST_ADDOPTS", ASYNCIO_SCOPE)


RANDOM_TESTS = """
import random

def test_one():
    print("drew", random.random())

def test_two():
    print("drew", random.random())

def test_three():
    print("drew", random.random())

def test_four():
    print("drew", random.random())
"""


def _draws(result: pytest.RunResult) -> list[str]:
    """The numbers the tests drew, and the tests in the order they ran."""
    out = result.stdout.str()
    order = re.findall(r"test_random\.py::(test_\w+) PASSED", out)
    return [*order, *re.findall(r"drew (0\.\d+)", out)]


@pytest.mark.usefixtures("randomly")
def test_randomly_same_seed_and_order_remotely(project: pytest.Pytester, gpu_run: GpuRun) -> None:
    project.makepyfile(test_random=RANDOM_TESTS)
    remote = gpu_run("-p", "randomly", "-v", "-rP")
    seed = re.search(r"Using --randomly-seed=(\d+)", remote.stdout.str())
    assert seed is not None
    local = project.runpytest_inprocess("-p", "randomly", f"--randomly-seed={seed[1]}", "-v", "-rP")
    assert len(_draws(remote)) == 8
    assert _draws(remote) == _draws(local)
    remote_ran(remote, 4)


@pytest.mark.usefixtures("randomly")
def test_no_randomly_is_respected_remotely(project: pytest.Pytester, gpu_run: GpuRun) -> None:
    project.makepyfile(
        test_loaded="""
        def test_loaded(request):
            print("randomly loaded:", request.config.pluginmanager.hasplugin("randomly"))
        """
    )
    gpu_run("-rP").stdout.fnmatch_lines(["randomly loaded: True"])
    remote = gpu_run("-p", "no:randomly", "-rP")
    remote.stdout.fnmatch_lines(["randomly loaded: False"])
    assert "randomly-seed" not in remote.stdout.str()


def test_async_tests_and_fixtures_run_remotely(project: pytest.Pytester, gpu_run: GpuRun) -> None:
    project.makepyfile(
        test_async="""
        import asyncio
        import pytest
        import pytest_asyncio

        @pytest_asyncio.fixture
        async def resource():
            await asyncio.sleep(0)
            yield "ready"
            await asyncio.sleep(0)

        @pytest.mark.asyncio
        async def test_asyncio(resource):
            await asyncio.sleep(0)
            assert resource == "ready"

        @pytest.mark.asyncio
        async def test_asyncio_fails():
            await asyncio.sleep(0)
            assert 1 == 2

        @pytest.fixture
        def anyio_backend():
            return "asyncio"

        @pytest.fixture
        async def anyio_resource(anyio_backend):
            yield anyio_backend

        @pytest.mark.anyio
        async def test_anyio(anyio_resource):
            import anyio
            await anyio.sleep(0)
            assert anyio_resource == "asyncio"
        """
    )
    local, remote = both(project, gpu_run, "-rf")
    for result in (local, remote):
        result.assert_outcomes(passed=2, failed=1)
        result.stdout.fnmatch_lines(["FAILED test_async.py::test_asyncio_fails - assert 1 == 2"])
    remote_ran(remote, 3)


def test_hypothesis_shrinks_remotely(project: pytest.Pytester, gpu_run: GpuRun) -> None:
    project.makepyfile(
        test_property="""
        from hypothesis import given, settings, strategies as st

        @settings(database=None)
        @given(st.integers(min_value=0))
        def test_small(x):
            assert x < 1000
        """
    )
    local, remote = both(project, gpu_run)
    for result in (local, remote):
        result.assert_outcomes(failed=1)
        # The shrunk example (Hypothesis calls it "Failing test case" or "Falsifying example").
        result.stdout.fnmatch_lines(["E  * test_small(", "E  * x=1000,", "E  * )"])
    remote_ran(remote, 1)


COVERED = """
def on_gpu(x):
    if x > 0:
        return "positive"
    return "other"
"""


def test_cov_counts_lines_run_remotely(project: pytest.Pytester, gpu_run: GpuRun) -> None:
    project.mkpydir("gpulib")
    (project.path / "gpulib" / "kernels.py").write_text(COVERED)
    project.makepyfile(
        test_kernels="""
        from gpulib.kernels import on_gpu

        def test_positive():
            assert on_gpu(1) == "positive"

        def test_other():
            assert on_gpu(0) == "other"
        """
    )
    args = ("--cov=gpulib", "--cov-branch", "--cov-report=term-missing", "--cov-fail-under=100")
    local, remote = both(project, gpu_run, *args)
    for result in (local, remote):
        result.assert_outcomes(passed=2)
        assert result.ret == 0
        result.stdout.fnmatch_lines(["gpulib/kernels.py * 100%", "*Required test coverage of 100*"])
    remote_ran(remote, 2)
    assert not list(project.path.glob(".coverage.*")), "every data file was combined"
    # Half the paths run remotely: --cov-fail-under counts what the instance measured.
    missed = gpu_run(*args, "-k", "positive")
    missed.stdout.fnmatch_lines(["gpulib/kernels.py * 67%   5", "*FAIL Required test coverage*"])
    assert missed.ret == pytest.ExitCode.TESTS_FAILED


def test_cov_under_xdist_counts_remote_lines(project: pytest.Pytester, gpu_run: GpuRun) -> None:
    project.mkpydir("gpulib")
    (project.path / "gpulib" / "kernels.py").write_text(COVERED)
    project.makepyfile(
        test_kernels="""
        from gpulib.kernels import on_gpu

        def test_positive():
            assert on_gpu(1) == "positive"

        def test_other():
            assert on_gpu(0) == "other"
        """
    )
    result = gpu_run("-n", "2", "--cov=gpulib", "--cov-report=term-missing", "--cov-fail-under=100")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["gpulib/kernels.py * 100%", "*Required test coverage of 100*"])
    assert result.ret == 0
    remote_ran(result, 2)


def test_coverage_travels_only_with_cov(project: pytest.Pytester, gpu_run: GpuRun) -> None:
    project.makepyfile(
        test_shipped="""
        import os

        def test_shipped():
            print("coverage shipped:", os.path.isdir(".gpucloud/pkg/coverage"))
        """
    )
    gpu_run("-rP").stdout.fnmatch_lines(["coverage shipped: False"])
    gpu_run("-rP", "--cov=.", "--cov-report=").stdout.fnmatch_lines(["coverage shipped: True"])


def test_s_shows_remote_prints_as_they_happen(project: pytest.Pytester, gpu_run: GpuRun) -> None:
    go = project.path / "go"
    project.makepyfile(
        test_live=f"""
        import pathlib
        import time

        def test_waits_to_be_seen():
            print("remote says hi")
            go = pathlib.Path({str(go)!r})
            deadline = time.monotonic() + 60
            while not go.exists():
                assert time.monotonic() < deadline, "its print was never seen"
                time.sleep(0.05)
        """
    )
    command = [sys.executable, "-m", "pytest", *gpu_run.args(), "-s", "-p", "no:cacheprovider"]
    with subprocess.Popen(
        command, cwd=project.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as proc:
        assert proc.stdout is not None
        seen = _read_until(proc, b"remote says hi", 90)
        go.touch()
        out, _ = proc.communicate(timeout=60)
    assert b"remote says hi" in seen, seen.decode(errors="replace")
    assert b"1 passed" in out, (seen + out).decode(errors="replace")
    # Only the test's output came: the remote session's own terminal lines did not.
    assert (seen + out).count(b"test session starts") == 1, (seen + out).decode(errors="replace")


def _read_until(proc: subprocess.Popen[bytes], wanted: bytes, limit: float) -> bytes:
    """What ``proc`` printed until ``wanted`` (or it ended, or ``limit`` seconds passed)."""
    assert proc.stdout is not None
    seen, deadline = b"", time.monotonic() + limit
    while wanted not in seen and time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.5)[0]:
            chunk = proc.stdout.read1(4096)  # type: ignore[attr-defined]
            if not chunk:
                break
            seen += chunk
    return seen


PYTEST_OWN = """
import pytest

def test_alpha():
    pass

def test_beta():
    assert 0, "beta fails"

@pytest.mark.slow
def test_slow():
    pass

def test_skipme():
    pass

def test_deselected():
    pass

def test_gamma():
    pytest.skip("not here")
"""


def test_pytest_own_selection_summaries_and_durations(
    project: pytest.Pytester, gpu_run: GpuRun
) -> None:
    project.makeini("[pytest]\nmarkers =\n    slow: slow\n")
    project.makepyfile(test_own=PYTEST_OWN)
    args = (
        "-k",
        "not skipme",
        "-m",
        "not slow",
        "--deselect",
        "test_own.py::test_deselected",
        "-ra",
        "--durations=0",
        "--durations-min=0",
    )
    local, remote = both(project, gpu_run, *args)
    assert local.parseoutcomes() == remote.parseoutcomes()
    assert remote.parseoutcomes() == {"passed": 1, "failed": 1, "skipped": 1, "deselected": 3}
    for result in (local, remote):
        result.stdout.fnmatch_lines(
            [
                "*slowest durations*",
                "*call * test_own.py::test_beta",
                "*short test summary info*",
                "SKIPPED [[]1[]] test_own.py:*: not here",
                "FAILED test_own.py::test_beta - AssertionError: beta fails",
            ]
        )
    remote_ran(remote, 3)


def test_stepwise_holds_remotely(project: pytest.Pytester, gpu_run: GpuRun) -> None:
    project.makepyfile(
        test_steps="""
        import os

        def test_one():
            pass

        def test_two():
            assert os.path.exists("fixed")

        def test_three():
            pass
        """
    )
    first = gpu_run("--sw", "-v")
    first.assert_outcomes(passed=1, failed=1)
    first.stdout.no_fnmatch_line("*test_three*")
    (project.path / "fixed").touch()
    second = gpu_run("--sw", "-v")
    second.assert_outcomes(passed=2, deselected=1)
    second.stdout.fnmatch_lines(["*test_two PASSED*", "*test_three PASSED*"])


def test_pdb_says_it_cannot_reach_a_remote_test(project: pytest.Pytester, gpu_run: GpuRun) -> None:
    project.makeini("[pytest]\naddopts = --pdb\n")
    project.makepyfile(
        test_debug="""
        def test_fails():
            assert 0

        def test_after():
            pass
        """
    )
    result = gpu_run.subprocess(timeout=120)
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        ["gpu-cloud: --pdb cannot stop in test_debug.py::test_fails: it ran on T4 i-*"]
    )
    assert "(Pdb)" not in result.stdout.str()
    traced = gpu_run("--trace", "-k", "after")
    traced.assert_outcomes(passed=1, deselected=1)
    traced.stdout.fnmatch_lines(
        ["gpu-cloud: --trace cannot stop in test_debug.py::test_after: it ran on T4 i-*"]
    )
