"""The ``lyceum`` provider end to end on the simulated cloud's Lyceum dialect, and the facts
of Lyceum's API that the provider and the dialect rely on (each names its source)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_gpucloud.cli import cleanup
from pytest_gpucloud.providers.lyceum import _address
from tests.vendor_sims import GPU_TEST, KEY, VendorRun, VendorSim, start

# The first attempt writes the file that preempts its spot instance (fault "preempt",
# on_file) and waits to be lost; the second, on a fresh instance, passes at once. Both run on
# this machine (simulated instances), so a file outside their homes tells them apart.
SPOT_TEST = """
import os, pathlib, time, pytest

@pytest.mark.gpu("H100", spot=True)
def test_on_spot():
    tried = pathlib.Path(ATTEMPTS)
    if not tried.exists():
        tried.touch()
        (pathlib.Path(os.environ["HOME"]) / "lose-me").touch()
        time.sleep(30)
"""


@pytest.fixture
def lyc() -> Iterator[VendorSim]:
    yield from start("lyceum")


@pytest.fixture
def run(pytester: pytest.Pytester, lyc: VendorSim, monkeypatch: pytest.MonkeyPatch) -> VendorRun:
    pytester.makepyfile(test_gpu=GPU_TEST)
    return VendorRun(pytester, lyc, monkeypatch)


def test_a_gpu_test_passes_through_the_null_ip_window_on_tofu_shown_in_the_header(
    run: VendorRun, lyc: VendorSim, pytester: pytest.Pytester
) -> None:
    pytester.makepyfile(test_gpu=GPU_TEST.replace('"H100"', '["H200", "H100"]'))
    lyc.fault(kind="http_error", op="create", status=500, code="out_of_capacity", gpu_type="H200")
    lyc.fault(kind="address_late", delay_s=0.5)
    result = run("-p", "no:randomly")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["gpu-cloud: host keys: trust on first use (lyceum*"])
    # The capacity 500 on H200 failed over to the next choice.
    assert [r["status"] for r in lyc.calls("POST", "/vms/create")] == [500, 200]
    lyc.wait_gone()


def test_insufficient_credits_are_one_clear_error_without_failover(
    run: VendorRun, lyc: VendorSim
) -> None:
    """Source: Lyceum's CLI 1.2.2 (_STATUS_HINTS): HTTP 402 means insufficient credits."""
    lyc.fault(kind="http_error", op="create", status=402, code="quota_exceeded", times=None)
    result = run("-p", "no:randomly")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*gpu-cloud: Lyceum refused*insufficient credits*"])
    assert len(lyc.calls("POST", "/vms/create")) == 1


def test_strict_refuses_tofu(run: VendorRun) -> None:
    result = run("--gpu-host-key", "strict")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--gpu-host-key strict: provider lyceum can verify no*"])


@pytest.mark.parametrize("fallback", [False, True])
def test_a_preempted_spot_instance_is_lost_and_its_test_runs_again(
    run: VendorRun, lyc: VendorSim, pytester: pytest.Pytester, fallback: bool
) -> None:
    # With the fallback, spot comes from --gpu-spot rather than from the marker.
    marker = '"H100")' if fallback else '"H100", spot=True)'
    source = SPOT_TEST.replace('"H100", spot=True)', marker)
    attempts = pytester.path / "attempts"
    pytester.makepyfile(test_gpu=source.replace("ATTEMPTS", repr(str(attempts))))
    lyc.fault(kind="preempt", on_file="lose-me")
    args = ["-p", "no:randomly", "--gpu-timeout", "60"]
    result = run(*args, *(["--gpu-spot", "--gpu-spot-fallback"] if fallback else []))
    result.assert_outcomes(passed=1)
    ids = {instance["id"] for instance in lyc.instances()}
    # The cost report's lines: an instance id, then its GPU.
    summary = [line for line in result.outlines if line.split()[:1] and line.split()[0] in ids]
    assert len(summary) == 2, summary
    assert "spot" in summary[0]
    assert ("spot" in summary[1]) is not fallback
    assert lyc.instances()[0]["termination_reason"] == "preempted"


def test_cleanup_deletes_an_orphan_found_by_its_display_name(
    lyc: VendorSim,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    name = f"gpucloud-0123456789ab-{int(time.time()) - 60}"
    made = lyc.api.post(
        "/vms/create",
        json={
            "user_public_key": KEY,
            "hardware_profile": "t4",
            "instance_type": "on-demand",
            "instance_specs": {"gpu_count": 1},
            "display_name": name,
        },
    )
    made.raise_for_status()
    monkeypatch.setenv("LYCEUM_API_KEY", lyc.api_key)
    monkeypatch.setenv("GPUCLOUD_PROVIDER", "lyceum")
    monkeypatch.setenv("GPUCLOUD_API_URL", lyc.base_url)
    assert cleanup.main(["--yes"], cwd=tmp_path) == 0
    assert f"deleted {made.json()['vm_id']}" in capsys.readouterr().out
    lyc.wait_gone()


def test_vm_answers_are_as_captured(lyc: VendorSim) -> None:
    """Sources (the project's vendor notes): live captures of github:onticlabs/skypilot-lyceum
    (tests/fixtures/lyceum_api): the create answers ``hardware_profile``/``gpu_count`` null
    and ``instance_specs.gpu_count``; ``vm_id`` is 32 hex digits or a dashed UUID; the
    list includes terminated VMs; 404 ``{"detail": "VM not found"}``; no capacity is a 500
    "could not be provisioned"; /pricing prices are strings. Lyceum's CLI 1.2.2:
    ``instance_specs.gpu_count`` 0 becomes one GPU."""
    body = {
        "user_public_key": KEY,
        "hardware_profile": "t4",
        "instance_specs": {"gpu_count": 0},
        "display_name": "x",
    }
    first = lyc.api.post("/vms/create", json=body).json()
    second = lyc.api.post("/vms/create", json=body).json()
    assert (first["hardware_profile"], first["gpu_count"]) == (None, None)
    assert first["instance_specs"]["gpu_count"] == 1
    assert sorted(len(vm["vm_id"]) for vm in (first, second)) == [32, 36]
    for vm in (first, second):
        assert lyc.api.delete(f"/vms/{vm['vm_id']}").json()["status"] == "terminated"
    time.sleep(0.2)
    listed = lyc.api.get("/vms/list").json()["vms"]
    assert {vm["status"] for vm in listed} == {"terminated"}
    missing = lyc.api.get("/vms/nope/status")
    assert (missing.status_code, missing.json()) == (404, {"detail": "VM not found"})
    price = lyc.api.get("/pricing").json()["prices"][0]
    assert isinstance(price["unit_price_per_hour"], str)
    lyc.fault(kind="http_error", op="create", status=500, code="out_of_capacity")
    refused = lyc.api.post("/vms/create", json=body)
    assert refused.status_code == 500
    assert "could not be provisioned" in refused.json()["detail"]


def test_an_address_may_carry_a_port() -> None:
    """Source: live captures (onticlabs/skypilot-lyceum): ``ip_address`` is ``"203.0.113.10"``,
    ``"198.51.100.20:22"``, or null while the VM is ready."""
    assert _address("203.0.113.10") == ("203.0.113.10", 22)
    assert _address("198.51.100.20:2222") == ("198.51.100.20", 2222)
    assert _address(None) is None
    assert _address("203.0.113.10; reboot") is None
