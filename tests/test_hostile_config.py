"""Finding 9 of the hostile-instance review: an ini file planted above the project cannot
choose where the API key goes; the S3 endpoint keeps to https; presigned URLs live no
longer than a test needs; an image name is never an option; logs and artifacts are this
user's only."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from pytest_gpucloud.config.settings import resolve
from pytest_gpucloud.core.errors import ConfigError
from pytest_gpucloud.features.data import DataSource
from tests.cloud import GpuRun, Sim, Store

ONE_TEST = "import pytest\n\n@pytest.mark.gpu('T4')\ndef test_a():\n    pass\n"


@pytest.mark.skipif(os.getuid() != 0, reason="only root can give a file to another user")
def test_an_api_url_from_another_users_ini_is_refused_unless_confirmed(
    pytester: pytest.Pytester, sim: Sim, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A shared folder (think /tmp) whose ini another user wrote: pytest finds it from a
    # project below that has none, and the bearer key would go to their URL.
    ini = pytester.makeini(f"[pytest]\ngpu_cloud_api_url = {sim.url}\n")
    os.chown(ini, 65534, 65534)
    project = pytester.mkdir("project")
    (project / "test_a.py").write_text(ONE_TEST)
    monkeypatch.chdir(project)
    monkeypatch.setenv("GPUCLOUD_API_KEY", sim.api_key)
    monkeypatch.delenv("GPUCLOUD_API_URL", raising=False)
    before = len(sim.requests())
    result = pytester.runpytest_inprocess("--gpu-cloud")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*gpu-cloud: ini gpu_cloud_api_url *belongs to another user*GPUCLOUD_API_URL*"]
    )
    assert len(sim.requests()) == before  # the key went nowhere
    monkeypatch.setenv("GPUCLOUD_API_URL", sim.url)  # confirmed
    pytester.runpytest_inprocess("--gpu-cloud", "-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_an_api_url_from_an_ini_outside_the_rootdir_is_refused(
    pytester: pytest.Pytester, sim: Sim, monkeypatch: pytest.MonkeyPatch
) -> None:
    ini = pytester.path / "elsewhere.ini"
    ini.write_text(f"[pytest]\ngpu_cloud_api_url = {sim.url}\n")
    project = pytester.mkdir("project")
    (project / "test_a.py").write_text(ONE_TEST)
    monkeypatch.setenv("GPUCLOUD_API_KEY", sim.api_key)
    monkeypatch.delenv("GPUCLOUD_API_URL", raising=False)
    result = pytester.runpytest_inprocess(
        "--gpu-cloud", "-c", str(ini), f"--rootdir={project}", str(project)
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*gpu-cloud: ini gpu_cloud_api_url *outside the rootdir*"])


@pytest.mark.parametrize(
    ("endpoint", "ok"),
    [
        ("http://minio.example.com:9000", False),
        ("https://minio.example.com:9000", True),
        ("http://127.0.0.1:9000", True),
    ],
)
def test_the_s3_endpoint_keeps_to_https_off_this_machine(endpoint: str, ok: bool) -> None:
    def read() -> object:
        return resolve(lambda dest: None, lambda name: None, {"GPUCLOUD_S3_ENDPOINT": endpoint})

    if ok:
        read()
    else:
        with pytest.raises(ConfigError, match=r"GPUCLOUD_S3_ENDPOINT.*must use https"):
            read()


def test_presigned_urls_live_as_long_as_the_test_may(store: Store) -> None:
    store.put("data/w.bin", b"w")
    source = DataSource(store.endpoint, 30)
    spec = asyncio.run(
        source.presign("t.py::test_a", (("w", f"s3://{store.bucket}/data/w.bin"),), 60)
    )
    [[_, url, _, _]] = spec["w"]["objects"]
    assert parse_qs(urlsplit(url).query)["X-Amz-Expires"] == ["90"]


@pytest.mark.parametrize("where", ["option", "marker"])
def test_an_image_that_looks_like_an_option_is_refused(
    gpu_run: GpuRun, pytester: pytest.Pytester, where: str
) -> None:
    image = "--privileged"
    if where == "option":
        pytester.makepyfile(ONE_TEST)
        result = gpu_run(f"--gpu-image={image}")
        assert result.ret == pytest.ExitCode.USAGE_ERROR
        result.stderr.fnmatch_lines(["*gpu-cloud: --gpu-image '--privileged'*leading '-'*"])
    else:
        pytester.makepyfile(ONE_TEST.replace("gpu('T4')", f"gpu('T4', image={image!r})"))
        result = gpu_run()
        result.assert_outcomes(errors=1)
        result.stdout.fnmatch_lines(["*image must be a container image*no leading*"])


def test_setup_logs_and_artifacts_are_private(gpu_run: GpuRun, pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.gpu("T4")
        def test_a(gpu_artifacts):
            (gpu_artifacts / "deep").mkdir()
            (gpu_artifacts / "deep" / "report.txt").write_text("r")
        """
    )
    gpu_run("--gpu-setup", "echo set up", "-p", "no:cacheprovider").assert_outcomes(passed=1)
    gpucloud = pytester.path / ".gpucloud"
    [log] = (gpucloud / "logs").glob("*-setup.log")
    [report] = (gpucloud / "artifacts").rglob("report.txt")
    assert _mode(log) == 0o600
    assert _mode(report) == 0o600
    test_folder = report.parent.parent  # what is below it no other user can reach
    for folder in (gpucloud / "logs", test_folder, test_folder.parent):
        assert _mode(folder) == 0o700, folder


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)
