"""Strict projects: ``python -W error`` and ``filterwarnings = error`` in the user's ini.

Every process here is a new interpreter, so the plugin's imports happen under the strict
filters as they do on a user's machine: the simulated cloud's server, a ``--gpu-cloud``
session with xdist workers, ``--gpu-plan`` and the ``cleanup`` command.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterator

import pytest

# faulthandler: a crash before the banner still says where (an empty stderr said nothing).
STRICT = (sys.executable, "-X", "faulthandler", "-W", "error")
STRICT_INI = "[pytest]\nfilterwarnings =\n    error\n"


@pytest.fixture
def strict_sim(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A standalone simulated cloud under ``-W error``; its stderr must stay empty."""
    api_key = secrets.token_urlsafe(16)
    server = subprocess.Popen(
        [*STRICT, "-m", "pytest_gpucloud.sim", "--port", "0", f"--api-key={api_key}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    banner = server.stdout.readline()
    monkeypatch.setenv("GPUCLOUD_API_KEY", api_key)
    for name in ("GPUCLOUD_PROVIDER", "GPUCLOUD_API_URL"):
        monkeypatch.delenv(name, raising=False)
    if "serving the GPU cloud API on http://" not in banner:
        server.kill()
        _, stderr = server.communicate(timeout=20)
        pytest.fail(f"the simulated cloud did not start (exit {server.returncode}): {stderr!r}")
    try:
        yield banner.split(" on ")[1].split()[0]
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=20)
    assert stderr == ""


def _strict_pytest(pytester: pytest.Pytester, url: str, *args: str) -> pytest.RunResult:
    gpu_cloud = ("--gpu-cloud", "--gpu-provider", "rest", "--gpu-api-url", url)
    return pytester.run(*STRICT, "-m", "pytest", *gpu_cloud, *args, timeout=120)


def test_a_strict_session_runs_remote_tests_without_a_warning_line(
    pytester: pytest.Pytester, strict_sim: str
) -> None:
    pytester.makeini(STRICT_INI)
    pytester.makepyfile(
        """
        import warnings

        import pytest
        from cryptography.utils import CryptographyDeprecationWarning

        def test_local():
            pass

        @pytest.mark.gpu("T4")
        def test_remote():
            pass

        def test_the_users_own_warning_of_that_category_still_fails():
            warnings.warn("the user's own", CryptographyDeprecationWarning)
        """
    )
    result = _strict_pytest(pytester, strict_sim, "-n", "2", "-p", "no:randomly")
    result.assert_outcomes(passed=2, failed=1)
    assert "CryptographyDeprecationWarning: the user's own" in result.stdout.str()
    output = result.stdout.lines + result.stderr.lines
    assert not [line for line in output if "DSA" in line or "warnings summary" in line]
    assert result.stderr.str() == ""


def test_a_strict_plan_prints_the_plan_only(pytester: pytest.Pytester, strict_sim: str) -> None:
    pytester.makeini(STRICT_INI)
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.gpu("T4")
        def test_remote():
            pass
        """
    )
    result = _strict_pytest(pytester, strict_sim, "--gpu-plan")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    result.stdout.fnmatch_lines(["plan: 1 instance(s)*", "--gpu-plan: no instance was created*"])
    assert result.stderr.str() == ""


def test_strict_cleanup_answers_without_a_warning(
    pytester: pytest.Pytester, strict_sim: str
) -> None:
    pytester.makeini(f"{STRICT_INI}gpu_cloud_api_url = {strict_sim}\ngpu_cloud_provider = rest\n")
    result = pytester.run(*STRICT, "-m", "pytest_gpucloud", "cleanup", "--yes", timeout=60)
    assert result.ret == 0, result.stderr.str()
    result.stdout.fnmatch_lines(["no instances of project *"])
    assert result.stderr.str() == ""
