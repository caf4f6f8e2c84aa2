"""Finding 5 of the hostile-instance review: ``gpu.get()`` writes only inside its
destination, never through a link already there, and takes at most ``max_bytes``."""

from __future__ import annotations

import pytest

from tests.cloud import GpuRun

GETS = """
import pytest

from pytest_gpucloud.core.errors import InstanceError


def test_get_stays_inside(gpu_cloud, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = tmp_path / "conftest.py"
    victim.write_text("# the project's own\\n")
    down = tmp_path / "down"
    down.mkdir()
    (down / "sub").symlink_to(outside)  # a link already in the destination
    (down / "conftest.py").symlink_to(victim)
    with gpu_cloud.instance("T4") as gpu:
        gpu.run("mkdir -p made/sub && echo evil > made/sub/conftest.py")
        gpu.run("echo x > made/conftest.py")
        with pytest.raises(InstanceError, match="writes nothing through a link"):
            gpu.get("made", down)
        assert list(outside.iterdir()) == []
        assert victim.read_text() == "# the project's own\\n"
        assert not (down / "conftest.py").is_symlink()  # the link was replaced, not followed
        assert (down / "conftest.py").read_text() == "x\\n"

        gpu.run("head -c 5000 /dev/zero > big.bin")
        with pytest.raises(InstanceError, match="big.bin holds 5000 bytes, more than the 1000"):
            gpu.get("big.bin", tmp_path / "big.bin", max_bytes=1000)
        assert not (tmp_path / "big.bin").exists()
        with pytest.raises(InstanceError, match="more than the 1000 gpu.get"):
            gpu.get(".", tmp_path / "all", max_bytes=1000)
        gpu.get("big.bin", tmp_path / "big.bin", max_bytes=5000)
        assert (tmp_path / "big.bin").stat().st_size == 5000
"""


def test_get_writes_only_inside_its_destination(gpu_run: GpuRun, pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_gets=GETS)
    gpu_run("-p", "no:cacheprovider").assert_outcomes(passed=1)
