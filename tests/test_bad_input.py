"""Bad input of every source ends in a one-line error naming the culprit and the fix: a
non-zero exit, no traceback, no instance left (the ``sim`` fixture checks that).

Sources: marker arguments, options and ini values, the environment, and the GPU cloud's
answers (injected through the simulated cloud). The parsing of answers is also fuzzed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_gpucloud.core.catalog import GpuType, Offer
from pytest_gpucloud.core.errors import GpuCloudError
from pytest_gpucloud.providers.base import Instance
from pytest_gpucloud.providers.rest import MAX_BODY, RestProvider
from tests.cloud import GpuRun, Sim

USAGE = pytest.ExitCode.USAGE_ERROR
COLLECTION = pytest.ExitCode.INTERRUPTED  # pytest stops after collection errors
TESTS = pytest.ExitCode.TESTS_FAILED
API_ANSWER_FIX = "check that --gpu-api-url (GPUCLOUD_API_URL) is your GPU cloud's API"


@dataclass(frozen=True)
class Bad:
    """One bad input: how to give it, what the error must name, and how pytest exits."""

    name: str
    culprit: str
    fix: str
    exit: pytest.ExitCode
    marker: str = "gpu('T4')"
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    ini: str = ""
    faults: tuple[dict[str, Any], ...] = ()
    creates: bool = False  # an instance is made (then deleted) before the error


CASES = [
    # marker arguments
    Bad("negative count", "gpu('T4', count=-1): count must be", "from 1 to 16", COLLECTION,
        marker="gpu('T4', count=-1)"),
    Bad("count of the wrong type", "count='two'", "a whole number from 1 to 16", COLLECTION,
        marker="gpu('T4', count='two')"),
    Bad("unknown keyword", "unknown keyword 'colour'", "accepted: spec, count", COLLECTION,
        marker="gpu('T4', colour='red')"),
    Bad("negative timeout", "timeout=-5", "a duration such as", COLLECTION,
        marker="gpu('T4', timeout=-5)"),
    Bad("spec of the wrong type", "gpu(42)", 'a GPU type such as "A100"', COLLECTION,
        marker="gpu(42)"),
    Bad("the API key in env=", "env may not name GPUCLOUD_API_KEY", "remove it", COLLECTION,
        marker="gpu('T4', env='GPUCLOUD_API_KEY')"),
    Bad("unknown GPU type", 'unknown GPU type "T5000"', "(catalog: T4, L4", COLLECTION,
        marker="gpu('T5000')"),
    # options, ini keys and the environment
    Bad("negative budget", "--gpu-budget '-5'", "a positive number such as 5", USAGE,
        args=("--gpu-budget", "-5")),
    Bad("unparseable duration", "--gpu-timeout 'soon'", "a duration such as 300", USAGE,
        args=("--gpu-timeout", "soon")),
    Bad("unparseable ini duration", "ini gpu_cloud_boot_timeout '1 fortnight'",
        "a duration such as 300", USAGE, ini="gpu_cloud_boot_timeout = 1 fortnight"),
    Bad("unknown provider", "--gpu-provider 'aws'", "choose one of", USAGE,
        args=("--gpu-provider", "aws")),
    Bad("session id with a space", "GPUCLOUD_SESSION_ID 'my run'", "such as gh-1234-1", USAGE,
        env={"GPUCLOUD_SESSION_ID": "my run"}),
    Bad("negative retries", "--gpu-retries '-1'", "a whole number such as 0 or 3", USAGE,
        args=("--gpu-retries", "-1")),
    Bad("lifetime below the minimum", "--gpu-max-lifetime '10s'", "at least 60 s", USAGE,
        args=("--gpu-max-lifetime", "10s")),
    Bad("the API key allow-listed", "--gpu-env", "GPUCLOUD_API_KEY never travels", USAGE,
        args=("--gpu-env", "GPUCLOUD_API_KEY")),
    Bad("not a variable name", "GPUCLOUD_ENV '1BAD'", "names of environment variables", USAGE,
        env={"GPUCLOUD_ENV": "1BAD"}),
    Bad("API URL of another scheme", "GPUCLOUD_API_URL 'ftp://api.example.com'",
        "https://api.example.com", USAGE, env={"GPUCLOUD_API_URL": "ftp://api.example.com"}),
    Bad("API URL without https", "GPUCLOUD_API_URL 'http://api.example.com'",
        "must use https", USAGE, env={"GPUCLOUD_API_URL": "http://api.example.com"}),
    Bad("API URL that is no URL", "GPUCLOUD_API_URL 'not a url'", "such as https://", USAGE,
        env={"GPUCLOUD_API_URL": "not a url"}),
    # the GPU cloud's answers
    Bad("catalog that is not JSON", "answered GET /v1/gpu-types with a body that is not JSON",
        API_ANSWER_FIX, USAGE,
        faults=({"kind": "malformed", "op": "gpu_types", "body": '[{"name": '},)),
    Bad("catalog missing fields", "GET /v1/gpu-types with a bad value at 0.vram_gb",
        API_ANSWER_FIX, USAGE,
        faults=({"kind": "malformed", "op": "gpu_types", "body": '[{"name": "T4"}]'},)),
    Bad("enormous answer", "answered GET /v1/gpu-types with more than 4 MiB", API_ANSWER_FIX,
        USAGE, faults=({"kind": "malformed", "op": "gpu_types", "body": "[" + " " * MAX_BODY},)),
    Bad("port of the wrong type", "with a bad value at ssh_port", API_ANSWER_FIX, TESTS,
        faults=({"kind": "override", "op": "get", "fields": {"ssh_port": "twenty-two"}},),
        creates=True),
    Bad("ip that is not an address", "with a bad value at ip", API_ANSWER_FIX, TESTS,
        faults=({"kind": "override", "op": "get", "fields": {"ip": "10.0.0.1; reboot"}},),
        creates=True),
    Bad("hostile instance id", "POST /v1/instances with a bad value at id", API_ANSWER_FIX,
        TESTS, faults=({"kind": "override", "op": "create", "fields": {"id": "i-1 $(reboot)"}},),
        creates=True),
    Bad("hostile label", "with a bad value at labels.x", API_ANSWER_FIX, TESTS,
        faults=({"kind": "override", "op": "get", "fields": {"labels": {"x": "`reboot`"}}},),
        creates=True),
]  # fmt: skip


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")


def test_the_table_covers_every_source() -> None:
    assert len(CASES) >= 15
    assert {case.exit for case in CASES} == {USAGE, COLLECTION, TESTS}
    assert any(case.env for case in CASES)
    assert any(case.ini for case in CASES)
    assert any(case.faults for case in CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_a_one_line_error_naming_culprit_and_fix(
    case: Bad,
    gpu_run: GpuRun,
    sim: Sim,
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytester.makepyfile(
        test_x=f"import pytest\n\n@pytest.mark.{case.marker}\ndef test_a():\n    pass\n"
    )
    if case.ini:
        pytester.makeini(f"[pytest]\n{case.ini}\n")
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    for rule in case.faults:
        sim.fault(**rule)
    args = gpu_run.args()
    if "GPUCLOUD_API_URL" in case.env:  # the command line would win over it
        args = [arg for arg in args if arg not in ("--gpu-api-url", sim.url)]
    before = len(sim.instances())
    result = pytester.runpytest_inprocess(*args, *case.args, "-rE")
    output = result.outlines + result.errlines
    assert result.ret == case.exit, "\n".join(output)
    assert not any("Traceback" in line for line in output)
    lines = [line for line in output if case.culprit in line and "gpu-cloud:" in line]
    assert lines, "\n".join(output)
    assert all(case.fix in line for line in lines), lines
    created = len(sim.instances()) - before
    assert created == (1 if case.creates else 0)


# Fuzzing the parsing of answers: whatever the API says, a call returns what the API
# promises, in safe strings, or raises a one-line gpu-cloud error; nothing else.

OFFER = Offer(GpuType("T4", 16, 0.53, True, ("us-east-1",)), "us-east-1")
HOSTILE = st.sampled_from(
    ["", " ", "; reboot", "$(id)", "`id`", "a\nb", "../..", "'", '"', "\\", "|", "&", "\x00"]
)
TEXT = st.one_of(
    st.text(max_size=20), HOSTILE, st.from_regex(r"[A-Za-z0-9._-]{1,10}", fullmatch=True)
)
JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), TEXT),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=10,
)
VALID_INSTANCE: dict[str, Any] = {
    "id": "i-1",
    "status": "running",
    "gpu_type": "T4",
    "count": 1,
    "region": "us-east-1",
    "price_per_hour": 0.53,
    "created_at": "2026-01-01T00:00:00Z",
    "labels": {"gpucloud-project": "demo"},
    "ip": "127.0.0.1",
    "ssh_port": 2222,
    "ssh_user": "gpu",
    "ssh_host_key": "ssh-ed25519 AAAA",
}
# A valid answer with some fields replaced by anything at all, or removed.
INSTANCE = st.dictionaries(
    st.sampled_from(sorted(VALID_INSTANCE)), st.one_of(JSON, HOSTILE), max_size=4
).map(lambda changes: {**VALID_INSTANCE, **changes}) | st.just(VALID_INSTANCE).map(
    lambda answer: {k: v for k, v in answer.items() if k != "status"}
)
ERROR_BODY = st.fixed_dictionaries(
    {
        "error": st.fixed_dictionaries(
            {
                "code": st.sampled_from(
                    ["out_of_capacity", "rate_limited", "unauthorized", "not_found", "internal"]
                ),
                "message": st.one_of(TEXT, HOSTILE),
            }
        )
    }
)
BODY = st.one_of(
    ERROR_BODY.map(json.dumps),
    INSTANCE.map(json.dumps),
    st.lists(INSTANCE, max_size=2).map(json.dumps),
    JSON.map(json.dumps),
    st.binary(max_size=64).map(lambda raw: raw.decode("latin-1")),
)
FUZZ_KEY = "fuzz-api-key-4f1c"
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SAFE_LABEL = re.compile(r"[A-Za-z0-9 ._:@+/=,-]{0,256}")


async def _answers(status: int, body: str) -> list[object]:
    """What each call of the rest provider gives (or raises) for this one answer."""
    transport = httpx.MockTransport(lambda request: httpx.Response(status, text=body))
    provider = RestProvider("http://127.0.0.1:9", FUZZ_KEY, attempts=1, transport=transport)
    calls: list[Callable[[], Awaitable[object]]] = [
        provider.catalog,
        lambda: provider.get("i-1"),
        lambda: provider.list_instances({"gpucloud-project": "demo"}),
        lambda: provider.create(
            OFFER,
            count=1,
            image="img",
            ssh_public_key="ssh-ed25519 " + "A" * 40,
            labels={},
            max_lifetime_s=3600,
            client_token="token-123",
        ),
        lambda: provider.delete("i-1"),
    ]
    outcomes: list[object] = []
    for call in calls:
        try:
            outcomes.append(await call())
        except GpuCloudError as exc:
            outcomes.append(exc)
    await provider.aclose()
    return outcomes


def _check_safe(instance: Instance) -> None:
    assert SAFE_ID.fullmatch(instance.id)
    assert instance.ip is None or ipaddress.ip_address(instance.ip)
    for key, value in instance.labels.items():
        assert SAFE_LABEL.fullmatch(key)
        assert SAFE_LABEL.fullmatch(value)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(status=st.sampled_from([200, 201, 204, 400, 401, 404, 409, 422, 429, 500, 503]), body=BODY)
def test_any_api_answer_is_read_or_refused_with_a_one_line_error(status: int, body: str) -> None:
    for outcome in asyncio.run(_answers(status, body)):
        if isinstance(outcome, GpuCloudError):
            message = str(outcome)
            assert message.startswith("gpu-cloud: ")
            assert "\n" not in message
            assert FUZZ_KEY not in message
        elif isinstance(outcome, Instance):
            _check_safe(outcome)
        elif isinstance(outcome, list):
            for item in outcome:
                if isinstance(item, Instance):
                    _check_safe(item)
