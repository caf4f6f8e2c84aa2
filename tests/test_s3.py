"""S3 against a real S3 API on 127.0.0.1 (moto's server mode): artifact uploads land at the
documented keys, datasets are fetched once per instance through presigned URLs, and no AWS
credential ever reaches an instance (the sim records every command line and environment)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pytest

from pytest_gpucloud.features.data import DataError, DataSource
from pytest_gpucloud.remote.fixtures import artifacts_dir_name
from tests.cloud import GpuRun, Sim, Store

if TYPE_CHECKING:
    pass


def _assert_no_credentials_on_instances(sim: Sim, store: Store) -> None:
    commands: list[dict[str, Any]] = [c for i in sim.instances() for c in i["commands"]]
    assert commands
    for command in commands:
        seen = command["command"] + " " + " ".join(f"{k}={v}" for k, v in command["env"].items())
        for secret in store.secrets:
            assert secret not in seen
        assert not any(name.startswith("AWS_") for name in command["env"])
        assert "X-Amz-" not in seen  # presigned URLs travel in frames, not command lines


def test_artifacts_upload_to_the_documented_keys(
    gpu_run: GpuRun, pytester: pytest.Pytester, store: Store, sim: Sim
) -> None:
    pytester.makepyfile(
        test_up="""
        import pytest

        pytestmark = pytest.mark.gpu("T4")

        def test_model(gpu_artifacts):
            (gpu_artifacts / "weights").mkdir()
            (gpu_artifacts / "weights" / "w.bin").write_bytes(b"\\x00\\x01")
            (gpu_artifacts / "metrics.json").write_text('{"loss": 0.1}')

        def test_broken(gpu_artifacts):
            (gpu_artifacts / "log.txt").write_text("it broke")
            assert False

        def test_quiet():
            pass
        """
    )
    s3_url = f"s3://{store.bucket}/ci/runs"
    result = gpu_run(
        "--gpu-artifacts-s3", s3_url, "--gpu-s3-endpoint", store.endpoint, "--junitxml=out.xml"
    )
    result.assert_outcomes(passed=2, failed=1)
    (run_dir,) = (pytester.path / ".gpucloud" / "artifacts").iterdir()
    run_id = run_dir.name
    model = artifacts_dir_name("test_up.py::test_model")
    broken = artifacts_dir_name("test_up.py::test_broken")
    assert store.keys() == {
        f"ci/runs/{run_id}/{model}/weights/w.bin": b"\x00\x01",
        f"ci/runs/{run_id}/{model}/metrics.json": b'{"loss": 0.1}',
        f"ci/runs/{run_id}/{broken}/log.txt": b"it broke",
    }
    result.stdout.fnmatch_lines([f"*uploaded to {s3_url}/{run_id}/ (2 test(s))"])
    xml = (pytester.path / "out.xml").read_text()
    assert f'value="s3://{store.bucket}/ci/runs/{run_id}/{model}/"' in xml
    _assert_no_credentials_on_instances(sim, store)


DATA_TESTS = """
import pytest

DATA = {"weights": "s3://{bucket}/data/weights.bin", "corpus": "s3://{bucket}/data/corpus"}


@pytest.mark.gpu("T4", data=DATA)
def test_first(gpu_data):
    assert gpu_data["weights"].read_bytes() == b"w" * 5000
    assert sorted(p.relative_to(gpu_data["corpus"]).as_posix()
                  for p in gpu_data["corpus"].rglob("*") if p.is_file()) == ["a.txt", "sub/b.txt"]


@pytest.mark.gpu("T4", data=DATA)
def test_second(gpu_data):
    assert gpu_data["weights"].read_bytes() == b"w" * 5000
    assert (gpu_data["corpus"] / "sub" / "b.txt").read_text() == "bee"


@pytest.mark.gpu("T4", data={"gone": "s3://{bucket}/data/missing.bin"})
def test_missing(gpu_data):
    pass
"""


def test_datasets_are_fetched_once_per_instance(
    gpu_run: GpuRun, pytester: pytest.Pytester, store: Store, sim: Sim
) -> None:
    store.put("data/weights.bin", b"w" * 5000)
    store.put("data/corpus/a.txt", b"ay")
    store.put("data/corpus/sub/b.txt", b"bee")
    pytester.makepyfile(test_data=DATA_TESTS.replace("{bucket}", store.bucket))
    result = gpu_run("--gpu-s3-endpoint", store.endpoint, "-rA")
    result.assert_outcomes(passed=2, errors=1)
    # the second test found all three objects in the instance's cache
    for key in ("data/weights.bin", "data/corpus/a.txt", "data/corpus/sub/b.txt"):
        assert store.gets(key) == 1, key
    result.stdout.fnmatch_lines(
        ["*datasets: 2 download(s), 5.0 kB; 2 found in the instances' cache"]
    )
    result.stdout.fnmatch_lines(
        [
            f"gpu-cloud: test_data.py::test_missing: data 'gone' "
            f"(s3://{store.bucket}/data/missing.bin): not found: no object with that key*"
        ]
    )
    _assert_no_credentials_on_instances(sim, store)


def test_datasets_without_credentials_say_how_to_give_them(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    source = DataSource(store.endpoint, 3600)
    url = f"s3://{store.bucket}/x.bin"
    with pytest.raises(DataError) as caught:
        asyncio.run(source.presign("t.py::test_a", (("x", url),), 60))
    assert str(caught.value) == (
        f"gpu-cloud: t.py::test_a: data 'x' ({url}): no AWS credentials (set AWS_ACCESS_KEY_ID "
        "and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, in the environment of pytest)"
    )
