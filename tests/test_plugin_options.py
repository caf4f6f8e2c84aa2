"""The marker, the options and their errors, without any instance."""

from __future__ import annotations

import pytest


def test_gpu_marker_is_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_inprocess("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.gpu(spec=None, *, count=1*"])


def test_marked_tests_skip_without_gpu_cloud(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.gpu("A100")
        def test_a():
            pass

        def test_b():
            pass
        """
    )
    result = pytester.runpytest_inprocess("--strict-markers", "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*needs a GPU: run with --gpu-cloud*"])


@pytest.mark.parametrize(
    ("marker", "expected"),
    [
        ("gpu(42)", "*test_bad.py::test_a: gpu(42)*"),
        ("gpu('A100', colour='red')", "*test_bad.py::test_a:*colour*"),
    ],
)
def test_bad_marker_is_a_collection_error(
    pytester: pytest.Pytester, marker: str, expected: str
) -> None:
    pytester.makepyfile(
        test_bad=f"import pytest\n\n@pytest.mark.{marker}\ndef test_a():\n    pass\n"
    )
    result = pytester.runpytest_inprocess()
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*ERROR collecting*", expected, "*1 error*"])
    assert "Traceback" not in result.stdout.str()


def test_gpu_cloud_without_provider_names_both_ways_forward(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GPUCLOUD_API_KEY", raising=False)
    monkeypatch.delenv("GPUCLOUD_PROVIDER", raising=False)
    result = pytester.runpytest_subprocess("--gpu-cloud")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*GPUCLOUD_API_KEY*--gpu-provider sim*"])


@pytest.mark.parametrize(
    ("args", "env", "ini", "expected"),
    [
        (["--gpu-timeout", "soon"], {}, "", "*--gpu-timeout 'soon': *duration*"),
        (["--gpu-provider", "aws"], {}, "", "*--gpu-provider 'aws'*rest, runpod, sim*"),
        ([], {"GPUCLOUD_TIMEOUT": "-5"}, "", "*GPUCLOUD_TIMEOUT '-5'*"),
        ([], {}, "gpu_cloud_boot_timeout = 1 fortnight", "*ini gpu_cloud_boot_timeout*"),
        (["--gpu-api-url", "http://api.example.com"], {}, "", "*--gpu-api-url*https*"),
    ],
)
def test_bad_option_values_are_usage_errors(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    env: dict[str, str],
    ini: str,
    expected: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    result = pytester.runpytest_subprocess(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([expected])
    assert "Traceback" not in result.stderr.str()


def test_plugin_can_be_disabled(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_inprocess("-p", "no:gpucloud", "--gpu-cloud")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
