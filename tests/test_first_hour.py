"""What a new user sees: each line pinned as the README describes it (issue: the first hour)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pytest_gpucloud.core.units import format_dollars
from tests.cloud import GpuRun, Sim

USAGE = pytest.ExitCode.USAGE_ERROR


def test_a_repeated_option_is_named_as_typed_not_as_a_list(gpu_run: GpuRun) -> None:
    gpu_run.pytester.makepyfile(test_x="def test_a():\n    pass\n")
    result = gpu_run.subprocess("--gpu-env", "GPUCLOUD_API_KEY")
    assert result.ret == USAGE
    result.stderr.fnmatch_lines(["*--gpu-env 'GPUCLOUD_API_KEY': GPUCLOUD_API_KEY never travels*"])
    assert "['" not in result.stderr.str()


def test_a_named_variable_not_set_here_is_said_once(
    gpu_run: GpuRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GPUCLOUD_TEST_UNSET", raising=False)
    gpu_run.pytester.makepyfile(
        test_x="""
        import os, pytest

        @pytest.mark.gpu("T4", env="GPUCLOUD_TEST_UNSET")
        def test_a():
            assert os.environ.get("GPUCLOUD_TEST_UNSET") is None

        @pytest.mark.gpu("T4")
        def test_b():
            pass
        """
    )
    result = gpu_run("--gpu-env", "GPUCLOUD_TEST_UNSET")
    result.assert_outcomes(passed=2)
    said = [line for line in result.outlines if "GPUCLOUD_TEST_UNSET" in line]
    assert said == [
        "gpu-cloud: GPUCLOUD_TEST_UNSET is not set here (named by --gpu-env or gpu(env=...)): "
        "remote tests see it unset"
    ]


def test_a_provider_factory_that_raises_is_one_usage_error(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's own conftest example, run without its MYCLOUD_KEY."""
    monkeypatch.delenv("MYCLOUD_KEY", raising=False)
    pytester.makeconftest(
        """
        import os

        def pytest_gpucloud_register_providers():
            async def mycloud(settings):
                return os.environ["MYCLOUD_KEY"]

            return {"mycloud": mycloud}
        """
    )
    pytester.makepyfile(test_x="import pytest\n\n@pytest.mark.gpu('T4')\ndef test_a():\n    pass\n")
    result = pytester.runpytest_subprocess("--gpu-cloud", "--gpu-provider", "mycloud")
    assert result.ret == USAGE
    result.stderr.fnmatch_lines(
        ["ERROR: gpu-cloud: GPU provider 'mycloud' (*) failed to start: KeyError: 'MYCLOUD_KEY'"]
    )
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    assert "Traceback" not in result.stderr.str()


def test_an_unreachable_api_is_named_by_its_host(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUCLOUD_API_KEY", "k" * 20)
    pytester.makepyfile(test_x="import pytest\n\n@pytest.mark.gpu('T4')\ndef test_a():\n    pass\n")
    result = pytester.runpytest_subprocess(
        "--gpu-cloud", "--gpu-provider", "rest", "--gpu-api-url", "http://127.0.0.1:9"
    )
    assert result.ret == USAGE
    result.stderr.fnmatch_lines(["*could not reach the GPU cloud API at 127.0.0.1:9 for GET*"])


def test_gpu_plan_alone_prints_the_plan(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x="import pytest\n\n@pytest.mark.gpu('T4')\ndef test_a():\n    pass\n")
    result = pytester.runpytest_subprocess("--gpu-plan", "--gpu-provider", "sim")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*plan: 1 instance(s)*", "*--gpu-plan: no instance was created*"])


def test_gpu_options_without_gpu_cloud_are_named_in_the_header(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_x="import pytest\n\n@pytest.mark.gpu('T4')\ndef test_a():\n    pass\n")
    result = pytester.runpytest_inprocess("--gpu-budget", "5", "--gpu-provider", "sim")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(
        ["gpu-cloud: off (no --gpu-cloud): --gpu-provider, --gpu-budget do nothing; gpu tests "
         "are skipped"]
    )  # fmt: skip


def test_without_gpu_options_the_header_says_nothing(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x="def test_a():\n    pass\n")
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(passed=1)
    assert "gpu-cloud" not in result.stdout.str()


@pytest.mark.parametrize(
    ("amount", "shown"),
    [(0, "$0.0000"), (12.5, "$12.5000"), (0.0042, "$0.0042"), (0.0001, "$0.000100"),
     (0.000736, "$0.000736"), (0.0007, "$0.000700")],
)  # fmt: skip
def test_amounts_show_the_digits_that_tell_them_apart(amount: float, shown: str) -> None:
    assert format_dollars(amount) == shown


def test_a_tiny_budget_is_shown_with_its_digits(gpu_run: GpuRun) -> None:
    gpu_run.pytester.makepyfile(
        test_x="import pytest\n\n@pytest.mark.gpu('T4')\ndef test_a():\n    pass\n"
    )
    result = gpu_run("--gpu-budget", "0.0001", "--gpu-start", "lazy")
    result.stdout.fnmatch_lines(["*the budget of $0.000100 would be passed by*"])


def test_an_instance_row_counts_every_test_that_ran_on_it(gpu_run: GpuRun) -> None:
    gpu_run.pytester.makepyfile(
        test_x="""
        import time, pytest

        @pytest.mark.gpu("T4")
        def test_a():
            pass

        @pytest.mark.gpu("T4", timeout=1)
        def test_slow():
            time.sleep(30)
        """
    )
    result = gpu_run("-p", "no:randomly")
    assert result.parseoutcomes()["passed"] == 1
    rows = [line for line in result.outlines if line.startswith("i-") and " T4 " in line]
    assert len(rows) == 1
    assert " 2 tests " in rows[0]


def test_one_test_is_one_test_in_the_summary(gpu_run: GpuRun) -> None:
    gpu_run.pytester.makepyfile(
        test_x="import pytest\n\n@pytest.mark.gpu('T4')\ndef test_a():\n    pass\n"
    )
    result = gpu_run()
    result.assert_outcomes(passed=1)
    rows = [line for line in result.outlines if line.startswith("i-")]
    assert len(rows) == 1
    assert " 1 test " in rows[0]


def test_a_remote_only_fixture_in_a_local_test_says_where_it_lives(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_x="def test_a(gpu_artifacts):\n    pass\n")
    result = pytester.runpytest_inprocess()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*gpu-cloud: the gpu_artifacts fixture lives on the instance, for gpu-marked tests*"]
    )
    assert "fixture 'gpu_artifacts' not found" not in result.stdout.str()


def test_the_local_only_fixture_in_a_gpu_test_says_where_it_lives(gpu_run: GpuRun) -> None:
    gpu_run.pytester.makepyfile(
        test_x="import pytest\n\n@pytest.mark.gpu('T4')\ndef test_a(gpu_cloud):\n    pass\n"
    )
    result = gpu_run()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*gpu-cloud: the gpu_cloud fixture lives in the local session*"])
    assert "fixture 'gpu_cloud' not found" not in result.stdout.str()


def test_the_sim_says_images_are_not_pulled_and_shows_them(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GPUCLOUD_API_KEY", raising=False)
    pytester.makepyfile(
        test_x="""
        import pytest

        @pytest.mark.gpu("T4", image="img-a")
        def test_a():
            pass

        @pytest.mark.gpu("T4", image="img-b")
        def test_b():
            pass
        """
    )
    result = pytester.runpytest_subprocess("--gpu-cloud", "--gpu-provider", "sim")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["gpu-cloud: provider sim (*images (--gpu-image*are not pulled)"])
    result.stdout.fnmatch_lines(["*T4 requested for T4 image=img-a*"])
    result.stdout.fnmatch_lines(["*T4 requested for T4 image=img-b*"])


def test_the_readmes_fault_examples_are_rules_the_sim_takes(sim: Sim) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    rules = [json.loads(found) for found in re.findall(r"^\$ fault '(.*)'", readme, re.M)]
    assert {rule["kind"] for rule in rules} >= {"http_error", "preempt", "slow"}
    for rule in rules:
        sim.fault(**rule)
    config = re.search(r"-d '(\{\"boot_delay_s\".*?\})' http", readme)
    assert config is not None
    sim.configure(**json.loads(config.group(1)))


def test_failover_says_why_in_the_booting_line(gpu_run: GpuRun) -> None:
    gpu_run.sim.fault(
        kind="http_error",
        op="create",
        status=409,
        code="out_of_capacity",
        gpu_type="H100",
        times=None,
    )
    gpu_run.pytester.makepyfile(
        test_x="import pytest\n\n@pytest.mark.gpu(['H100', 'A100'])\ndef test_a():\n    pass\n"
    )
    result = gpu_run()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["gpu-cloud: A100* booting in * at $*/h (H100 in *, H100 in *: no capacity)"]
    )
    # a status line never continues the line of a test's progress
    assert not [line for line in result.outlines if "%]gpu-cloud" in line]


def test_a_remote_test_is_announced_when_sent_and_status_lines_come_as_they_happen(
    gpu_run: GpuRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sim's instances share this machine's disk: the remote test sees whether the local
    session announced it (pytest_runtest_logstart) before it ran."""
    announced = tmp_path / "announced"
    monkeypatch.setenv("GPUCLOUD_TEST_ANNOUNCED", str(announced))
    gpu_run.pytester.makeconftest(
        """
        import os, pathlib

        def pytest_runtest_logstart(nodeid):
            if "GPUCLOUD_SIM_INSTANCE" not in os.environ:  # the local session's, not the remote's
                pathlib.Path(os.environ["GPUCLOUD_TEST_ANNOUNCED"]).write_text(nodeid)
        """
    )
    gpu_run.pytester.makepyfile(
        test_x="""
        import os, pathlib, time, pytest

        @pytest.mark.gpu("T4", env="GPUCLOUD_TEST_ANNOUNCED")
        def test_a():
            seen = pathlib.Path(os.environ["GPUCLOUD_TEST_ANNOUNCED"]).read_text()
            assert seen == "test_x.py::test_a"
            time.sleep(1)
        """
    )
    result = gpu_run("-v")
    result.assert_outcomes(passed=1)
    lines = result.outlines
    busy = next(i for i, line in enumerate(lines) if "busy with test_x.py::test_a" in line)
    passed = next(i for i, line in enumerate(lines) if "test_x.py::test_a PASSED" in line)
    assert busy < passed, "the status line came after the result it leads to"


def test_a_machine_error_is_one_line_in_the_summary(gpu_run: GpuRun) -> None:
    gpu_run.pytester.makepyfile(
        test_x="""
        import time, pytest

        @pytest.mark.gpu("T4", timeout=1)
        def test_slow():
            time.sleep(30)
        """
    )
    result = gpu_run()
    # the gpu-cloud section, up to pytest's short summary (which under CI=true shows each
    # failure's whole message, as pytest does for any test)
    start = next(i for i, line in enumerate(result.outlines) if "= gpu-cloud =" in line)
    end = next(i for i, line in enumerate(result.outlines) if "short test summary" in line)
    summary = result.outlines[start:end]
    errors = [line for line in summary if line.startswith("i-") and "gpu-cloud:" in line]
    assert len(errors) == 1
    assert errors[0].endswith("(raise the limit with --gpu-timeout or gpu(timeout=...))")
    assert not [line for line in summary if "time.sleep(30)" in line]
