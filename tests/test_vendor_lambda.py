"""The ``lambda`` provider end to end on the simulated cloud's Lambda dialect, and the facts
of Lambda's API that the provider and the dialect rely on (each test names its source)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_gpucloud.cli import cleanup
from pytest_gpucloud.core.labels import EXPIRES, PROJECT, SESSION, project_label
from tests.vendor_sims import GPU_TEST, KEY, VendorRun, VendorSim, start

SPEC = "Lambda Cloud API spec 1.10.0 (cloud.lambda.ai/api/v1/openapi.json)"


@pytest.fixture
def lam() -> Iterator[VendorSim]:
    yield from start("lambda")


@pytest.fixture
def run(pytester: pytest.Pytester, lam: VendorSim, monkeypatch: pytest.MonkeyPatch) -> VendorRun:
    pytester.makepyfile(test_gpu=GPU_TEST)
    return VendorRun(pytester, lam, monkeypatch)


def test_a_gpu_test_passes_with_an_injected_host_key_and_the_session_key_is_deleted(
    run: VendorRun, lam: VendorSim
) -> None:
    """Source: Lambda spec 1.10.0: a launch takes ``user_data`` (cloud-init) and ``tags``,
    SSH keys are registered on the account by name (``POST``/``DELETE /ssh-keys``);
    cloud-init's ``cc_ssh`` module sets host keys from ``ssh_keys``."""
    result = run("-p", "no:randomly")
    result.assert_outcomes(passed=1)
    assert lam.api_key not in result.stdout.str() + result.stderr.str()
    launch = lam.calls("POST", "/instance-operations/launch")
    assert [r["status"] for r in launch] == [200]
    # The key was registered for the session and is gone; nothing is left running.
    assert [r["status"] for r in lam.calls("POST", "/ssh-keys")] == [200]
    assert [r["status"] for r in lam.calls("DELETE", "")][-1] == 200
    assert lam.api.get("/ssh-keys").json() == {"data": []}
    lam.wait_gone()


def test_capacity_refusal_fails_over_waiting_out_the_launch_limit_without_a_429(
    run: VendorRun, lam: VendorSim
) -> None:
    lam.fault(kind="http_error", op="create", status=400, code="out_of_capacity")
    started = time.monotonic()
    result = run("-p", "no:randomly")
    result.assert_outcomes(passed=1)
    statuses = [r["status"] for r in lam.calls("POST", "/instance-operations/launch")]
    assert statuses == [400, 200]
    assert time.monotonic() - started >= 12  # the second launch waited its turn


def test_a_quota_refusal_is_one_clear_error_without_failover(
    run: VendorRun, lam: VendorSim
) -> None:
    lam.fault(kind="http_error", op="create", status=400, code="quota_exceeded", times=None)
    result = run("-p", "no:randomly")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*gpu-cloud: Lambda refused*quota is used up*"])
    assert len(lam.calls("POST", "/instance-operations/launch")) == 1
    assert "Traceback" not in result.stdout.str()


def test_a_rate_limited_read_is_waited_out(run: VendorRun, lam: VendorSim) -> None:
    lam.fault(kind="http_error", op="get", status=429, code="rate_limited", retry_after=1)
    run("-p", "no:randomly").assert_outcomes(passed=1)
    assert 429 in [r["status"] for r in lam.calls("GET", "")]


def test_inject_refuses_a_machine_that_presents_another_host_key(
    run: VendorRun, lam: VendorSim
) -> None:
    lam.fault(kind="wrong_host_key")
    result = run("-p", "no:randomly", "--gpu-retries", "0")
    outcomes = result.parseoutcomes()
    assert "passed" not in outcomes
    result.stdout.fnmatch_lines(["*presented an SSH host key that differs*refused to connect*"])
    lam.wait_gone()


def test_the_plan_reads_lambdas_catalog_and_a_refused_key_is_one_clear_error(
    run: VendorRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The catalog's cents per hour for a whole instance become dollars per GPU and hour."""
    plan = run("--gpu-plan")
    plan.stdout.fnmatch_lines(["*H100*$3.29*"])
    monkeypatch.setenv("LAMBDA_API_KEY", "wrong")
    refused = run("-p", "no:randomly")
    assert refused.ret != 0
    text = refused.stdout.str() + refused.stderr.str()
    assert "Lambda refused the API key" in text
    assert "check LAMBDA_API_KEY" in text
    assert "Traceback" not in text


def test_tofu_is_refused_where_lambda_can_inject(run: VendorRun) -> None:
    result = run("--gpu-host-key", "tofu")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--gpu-host-key tofu: provider lambda verifies host keys*"])


def test_a_runtime_that_lambda_lacks_is_a_usage_error(run: VendorRun) -> None:
    result = run("--gpu-runtime", "podman")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--gpu-runtime podman cannot work on provider lambda*docker*"])


def test_spot_is_not_offered(run: VendorRun, pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_gpu="import pytest\n@pytest.mark.gpu('H100', spot=True)\ndef test_spot(): pass\n"
    )
    result = run("-p", "no:randomly")
    result.stdout.fnmatch_lines(["*offers no spot capacity*"])
    assert "passed" not in result.parseoutcomes()


def test_cleanup_deletes_an_orphan_and_its_session_key(
    lam: VendorSim,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    project = tmp_path / "proj"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\n")
    expired = str(int(time.time()) - 60)
    name = f"gpucloud-0123456789ab-{expired}"
    lam.api.post("/ssh-keys", json={"name": name, "public_key": KEY}).raise_for_status()
    tags = {SESSION: "0123456789ab", PROJECT: project_label("proj"), EXPIRES: expired}
    launch = lam.api.post(
        "/instance-operations/launch",
        json={
            "region_name": "us-east-1",
            "instance_type_name": "gpu_1x_t4",
            "ssh_key_names": [name],
            "name": name,
            "tags": [{"key": k, "value": v} for k, v in tags.items()],
        },
    )
    launch.raise_for_status()
    orphan = launch.json()["data"]["instance_ids"][0]
    monkeypatch.setenv("LAMBDA_API_KEY", lam.api_key)
    monkeypatch.setenv("GPUCLOUD_PROVIDER", "lambda")
    monkeypatch.setenv("GPUCLOUD_API_URL", lam.base_url)
    assert cleanup.main(["--yes"], cwd=project) == 0
    out = capsys.readouterr().out
    assert f"deleted {orphan}" in out
    assert f"deleted SSH key {name}" in out
    assert lam.api.get("/ssh-keys").json() == {"data": []}
    lam.wait_gone()


# -- facts of the documented API, as the dialect answers them ------------------------------


def test_instance_types_are_an_object_keyed_by_name_with_cents(lam: VendorSim) -> None:
    """Source: Lambda spec 1.10.0, #/components/schemas/InstanceTypes: ``data`` is an object
    keyed by instance type name; ``price_cents_per_hour`` an integer; capacity by region."""
    data = lam.api.get("/instance-types").json()["data"]
    assert isinstance(data, dict)
    entry = data["gpu_1x_h100"]
    assert isinstance(entry["instance_type"]["price_cents_per_hour"], int)
    assert entry["instance_type"]["specs"]["gpus"] == 1
    assert {"name", "description"} <= entry["regions_with_capacity_available"][0].keys()


def test_errors_carry_a_code_and_launch_limits_answer_429(lam: VendorSim) -> None:
    """Sources: Lambda spec 1.10.0: error bodies ``{"error": {"code", "message"}}`` (match on
    the code); ``global/object-does-not-exist`` for an unknown instance (404);
    ``global/invalid-api-key`` (401); launch at most once every 12 s (info.description);
    ``ssh_key_names``: exactly one key; 429 bodies are undocumented (SkyPilot's
    lambda_utils retries 429 without reading it). ``quantity`` above 1 is refused (SkyPilot
    issue #7084)."""
    missing = lam.api.get("/instances/0920582c7ff041399e34823a0be62549")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "global/object-does-not-exist"
    bad_key = lam.api.get("/instances", headers={"Authorization": "Bearer wrong"})
    assert (bad_key.status_code, bad_key.json()["error"]["code"]) == (401, "global/invalid-api-key")
    lam.api.post("/ssh-keys", json={"name": "k", "public_key": KEY}).raise_for_status()
    body = {
        "region_name": "us-east-1",
        "instance_type_name": "gpu_1x_t4",
        "ssh_key_names": ["k", "k2"],
    }
    two_keys = lam.api.post("/instance-operations/launch", json=body)
    assert two_keys.json()["error"]["code"] == "global/invalid-parameters"
    body["ssh_key_names"] = ["k"]
    too_soon = lam.api.post("/instance-operations/launch", json={**body, "quantity": 1})
    assert too_soon.status_code == 429
    assert too_soon.content == b""
