"""The simulated cloud, driven over real HTTP (httpx) and real SSH (asyncssh)."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import asyncssh
import httpx
import pytest
from pydantic import TypeAdapter

from pytest_gpucloud.core.wire import (
    ErrorBody,
    GpuTypeModel,
    InstanceModel,
    SimInstanceRecord,
    SimRequestRecord,
)
from pytest_gpucloud.sim import SimConfig, SimServer
from pytest_gpucloud.sim.config import default_catalog

CLIENT_KEY = asyncssh.generate_private_key("ssh-ed25519")
PUBLIC_KEY = CLIENT_KEY.export_public_key().decode()
AUTH = {"Authorization": "Bearer test-token"}
SETTINGS: dict[str, Any] = {
    "boot_delay_s": 0.01,
    "terminate_delay_s": 0.01,
    "lifetime_scale": 1.0,
    "lifetime_check_interval_s": 0.02,
    "extra_path": None,
    "catalog": [gpu.model_dump() for gpu in default_catalog()],
}
RECORDS = TypeAdapter(list[SimInstanceRecord])


@pytest.fixture(scope="module")
def sim_url() -> Iterator[str]:
    with SimServer(SimConfig(**SETTINGS)) as server:
        assert server.url is not None
        yield server.url


@pytest.fixture(scope="module")
def client(sim_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim_url, headers=AUTH, timeout=10) as client:
        yield client


@pytest.fixture
def api(client: httpx.Client) -> Iterator[httpx.Client]:
    """A client of the shared sim; faults and settings are reset after each test."""
    yield client
    client.delete("/_sim/faults").raise_for_status()
    client.put("/_sim/config", json=SETTINGS).raise_for_status()


def create(api: httpx.Client, **fields: Any) -> httpx.Response:
    body = {
        "gpu_type": "T4",
        "image": "python:3.11-slim",
        "ssh_public_key": PUBLIC_KEY,
        "labels": {},
        "max_lifetime_s": 3600,
        "client_token": secrets.token_hex(8),
        **fields,
    }
    return api.post("/v1/instances", json=body)


def wait_for(api: httpx.Client, instance_id: str, status: str) -> InstanceModel:
    deadline = time.monotonic() + 5
    while True:
        instance = InstanceModel.model_validate_json(api.get(f"/v1/instances/{instance_id}").text)
        if instance.status == status:
            return instance
        assert time.monotonic() < deadline, f"{instance_id} is still {instance.status}"
        time.sleep(0.01)


def launch(api: httpx.Client, **fields: Any) -> InstanceModel:
    answer = create(api, **fields)
    assert answer.status_code == 201, answer.text
    return wait_for(api, answer.json()["id"], "running")


def record_of(api: httpx.Client, instance_id: str) -> SimInstanceRecord:
    records = RECORDS.validate_json(api.get("/_sim/instances").text)
    return next(r for r in records if r.id == instance_id)


def add_faults(api: httpx.Client, *rules: dict[str, Any]) -> None:
    api.post("/_sim/faults", json={"faults": list(rules)}).raise_for_status()


def error_code(answer: httpx.Response) -> str:
    return ErrorBody.model_validate_json(answer.text).error.code


def ssh_options(instance: InstanceModel, **overrides: Any) -> dict[str, Any]:
    assert instance.ssh_host_key is not None
    return {
        "host": instance.ip,
        "port": instance.ssh_port,
        "username": instance.ssh_user,
        "client_keys": [CLIENT_KEY],
        "known_hosts": ([asyncssh.import_public_key(instance.ssh_host_key)], [], []),
        "agent_path": None,
        "config": None,
        **overrides,
    }


class Ran(NamedTuple):
    exit_status: int | None  # None: the connection was lost
    stdout: bytes
    stderr: bytes


def ssh_run(instance: InstanceModel, command: str, stdin: bytes | None = None) -> Ran:
    async def run() -> Ran:
        async with asyncssh.connect(**ssh_options(instance)) as conn:
            done = await conn.run(command, input=stdin, encoding=None)
        assert isinstance(done.stdout, bytes)
        assert isinstance(done.stderr, bytes)
        return Ran(done.exit_status, done.stdout, done.stderr)

    return asyncio.run(run())


def alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def eventually(condition: Any, what: str) -> None:
    deadline = time.monotonic() + 5
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


# The REST API


def test_catalog_is_the_seed(api: httpx.Client) -> None:
    gpus = TypeAdapter(list[GpuTypeModel]).validate_json(api.get("/v1/gpu-types").text)
    table = {gpu.name: (gpu.vram_gb, gpu.price_per_hour) for gpu in gpus}
    assert table == {
        "T4": (16, 0.53),
        "L4": (24, 0.70),
        "A10G": (24, 1.01),
        "L40S": (48, 1.95),
        "A100-40GB": (40, 1.99),
        "A100-80GB": (80, 2.49),
        "H100": (80, 3.29),
        "H200": (141, 3.99),
        "B200": (180, 6.99),
    }
    assert all(gpu.available and gpu.regions for gpu in gpus)


def test_create_get_list_delete(api: httpx.Client) -> None:
    api.put("/_sim/config", json={"terminate_delay_s": 0.3}).raise_for_status()
    session = secrets.token_hex(4)
    answer = create(api, gpu_type="A100-80GB", count=2, labels={"session": session, "role": "a"})
    assert answer.status_code == 201
    created = InstanceModel.model_validate_json(answer.text)
    assert re.fullmatch(r"i-[0-9a-f]{8}", created.id)
    assert (created.status, created.region, created.price_per_hour) == (
        "provisioning",
        "us-east-1",
        4.98,
    )
    other = launch(api, labels={"session": session, "role": "b"})

    running = wait_for(api, created.id, "running")
    assert (running.ip, running.ssh_user) == ("127.0.0.1", "gpu")
    assert running.ssh_port
    assert running.ssh_host_key
    assert running.ssh_host_key.startswith("ssh-ed25519 ")

    def listed(*labels: str) -> set[str]:
        answer = api.get("/v1/instances", params={"label": list(labels)})
        return {item["id"] for item in answer.json()}

    assert listed(f"session={session}") == {created.id, other.id}
    assert listed(f"session={session}", "role=a") == {created.id}
    assert listed(f"session={session}", "role=c") == set()

    assert api.delete(f"/v1/instances/{created.id}").status_code == 202
    assert api.get(f"/v1/instances/{created.id}").json()["status"] == "terminating"
    assert api.delete(f"/v1/instances/{created.id}").status_code == 202
    wait_for(api, created.id, "terminated")
    assert listed(f"session={session}") == {other.id}
    gone = api.delete(f"/v1/instances/{created.id}")
    assert (gone.status_code, error_code(gone)) == (404, "not_found")
    record = record_of(api, created.id)
    assert record.termination_reason == "deleted"
    assert record.running_at
    assert record.deleted_at
    assert record.terminated_at
    assert record.created_at < record.running_at < record.deleted_at < record.terminated_at


def test_refusals(api: httpx.Client) -> None:
    def refusal(answer: httpx.Response) -> tuple[int, str]:
        return answer.status_code, error_code(answer)

    assert refusal(create(api, gpu_type="Z999")) == (400, "invalid_request")
    assert refusal(create(api, gpu_type="H200", region="eu-west-1")) == (503, "out_of_capacity")
    assert create(api, gpu_type="H200", region="eu-central-1").json()["region"] == "eu-central-1"
    assert refusal(create(api, max_lifetime_s=10)) == (422, "invalid_request")
    assert refusal(create(api, ssh_public_key="not a key at all, sorry")) == (
        422,
        "invalid_request",
    )
    assert refusal(api.post("/v1/instances", content=b"{")) == (400, "invalid_request")
    assert refusal(api.get("/v1/instances", params={"label": "no-equals"})) == (
        400,
        "invalid_request",
    )
    assert refusal(api.get("/v1/instances/i-00000000")) == (404, "not_found")
    assert refusal(api.delete("/v1/instances/i-00000000")) == (404, "not_found")
    assert refusal(api.get("/v1/nowhere")) == (404, "not_found")

    catalog = [{**gpu, "available": gpu["name"] != "T4"} for gpu in SETTINGS["catalog"]]
    api.put("/_sim/config", json={"catalog": catalog}).raise_for_status()
    assert refusal(create(api, gpu_type="T4")) == (503, "out_of_capacity")


def test_auth_with_an_api_key() -> None:
    with (
        SimServer(SimConfig(api_key="sekrit")) as server,
        httpx.Client(base_url=str(server.url)) as client,
    ):

        def status(path: str, token: str | None) -> int:
            headers = {} if token is None else {"Authorization": f"Bearer {token}"}
            return client.get(path, headers=headers).status_code

        assert status("/v1/gpu-types", None) == 401
        assert status("/v1/gpu-types", "wrong") == 401
        assert status("/_sim/instances", "wrong") == 401
        assert status("/v1/gpu-types", "sekrit") == 200
        refused = client.get("/v1/gpu-types", headers={"Authorization": "Bearer wrong"})
        assert error_code(refused) == "unauthorized"
        log = client.get("/_sim/requests", headers={"Authorization": "Bearer sekrit"}).json()
        assert [entry["status"] for entry in log] == [401, 401, 200, 401]


def test_auth_without_an_api_key(api: httpx.Client) -> None:
    def status(authorization: str) -> int:
        return api.get("/v1/gpu-types", headers={"Authorization": authorization}).status_code

    assert status("Bearer anything") == 200
    assert status("Bearer") == 401
    assert status("Basic dXNlcjpwdw==") == 401


def test_client_token_makes_create_idempotent(api: httpx.Client) -> None:
    first = create(api, client_token="token-idempotent-1")
    again = create(api, client_token="token-idempotent-1")
    assert (first.status_code, again.status_code) == (201, 201)
    assert first.json()["id"] == again.json()["id"]
    records = RECORDS.validate_json(api.get("/_sim/instances").text)
    assert [r.id for r in records].count(first.json()["id"]) == 1


def test_max_lifetime_is_enforced(api: httpx.Client) -> None:
    # lifetime_scale 0.001: the minimum max_lifetime_s (60) lasts 60 ms.
    api.put("/_sim/config", json={"lifetime_scale": 0.001}).raise_for_status()
    short = create(api, max_lifetime_s=60).json()["id"]
    long = create(api, max_lifetime_s=3600).json()["id"]
    wait_for(api, short, "terminated")
    assert api.get(f"/v1/instances/{long}").json()["status"] == "running"
    record = record_of(api, short)
    assert (record.termination_reason, record.deleted_at) == ("max_lifetime", None)


def test_boot_delay(api: httpx.Client) -> None:
    api.put("/_sim/config", json={"boot_delay_s": 0.3}).raise_for_status()
    created = create(api).json()
    assert api.get(f"/v1/instances/{created['id']}").json()["ssh_port"] is None
    wait_for(api, created["id"], "running")
    record = record_of(api, created["id"])
    assert record.running_at is not None
    assert (record.running_at - record.created_at).total_seconds() >= 0.3


def test_request_log(api: httpx.Client) -> None:
    since = datetime.now(timezone.utc)
    instance_id = create(api).json()["id"]
    create(api, gpu_type="Z999")
    api.delete(f"/v1/instances/{instance_id}")
    log = TypeAdapter(list[SimRequestRecord]).validate_json(api.get("/_sim/requests").text)
    mine = [(r.method, r.path, r.status) for r in log if r.time >= since]
    assert mine == [
        ("POST", "/v1/instances", 201),
        ("POST", "/v1/instances", 400),
        ("DELETE", f"/v1/instances/{instance_id}", 202),
    ]


# SSH and processes


def test_exec_output_exit_status_and_environment(
    api: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUCLOUD_API_KEY", "canary")
    instance = launch(api, gpu_type="L4", count=2)
    done = ssh_run(
        instance, "echo out; echo err >&2; pwd; env; command -v python3; command -v pytest; exit 3"
    )
    home = record_of(api, instance.id).home
    lines = done.stdout.decode().splitlines()
    assert (done.exit_status, done.stderr, lines[:2]) == (3, b"err\n", ["out", home])
    env = dict(line.split("=", 1) for line in lines[2:] if "=" in line)
    env.pop("PWD", None)  # set by sh itself
    assert env == {
        "PATH": f"{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": f"{home}/tmp",
        "LANG": "C.UTF-8",
        "GPUCLOUD_SIM_INSTANCE": instance.id,
        "GPUCLOUD_SIM_GPU": "L4:2",
    }
    assert b"canary" not in done.stdout
    assert lines[-2:] == [
        os.path.join(os.path.dirname(sys.executable), name) for name in ("python3", "pytest")
    ]
    [command] = record_of(api, instance.id).commands
    assert (command.exit_status, command.env["HOME"]) == (3, home)
    assert command.command.startswith("echo out;")


def test_extra_path_comes_first(api: httpx.Client, tmp_path: Path) -> None:
    tool = tmp_path / "gpu-tool"
    tool.write_text("#!/bin/sh\necho tool ran\n")
    tool.chmod(0o755)
    api.put("/_sim/config", json={"extra_path": str(tmp_path)}).raise_for_status()
    assert ssh_run(launch(api), "gpu-tool").stdout == b"tool ran\n"


def test_binary_stdin_round_trip(api: httpx.Client) -> None:
    data = bytes(range(256)) * 8192 + b"\x00\xff"  # 2 MiB and a bit
    done = ssh_run(launch(api), "cat", stdin=data)
    assert (done.exit_status, done.stdout == data) == (0, True)


def test_ssh_refuses_other_keys_and_users(api: httpx.Client) -> None:
    instance = launch(api)
    stranger = asyncssh.generate_private_key("ssh-ed25519")

    async def attempt(**overrides: Any) -> None:
        async with asyncssh.connect(**ssh_options(instance, **overrides)):
            pass

    with pytest.raises(asyncssh.PermissionDenied):
        asyncio.run(attempt(client_keys=[stranger]))
    with pytest.raises(asyncssh.PermissionDenied):
        asyncio.run(attempt(username="root"))


def test_closing_the_channel_kills_the_process(api: httpx.Client) -> None:
    instance = launch(api)

    async def start_then_hang_up() -> int:
        async with asyncssh.connect(**ssh_options(instance)) as conn:
            process = await conn.create_process("echo $$; exec sleep 30", encoding=None)
            return int(await process.stdout.readline())

    pid = asyncio.run(start_then_hang_up())
    eventually(lambda: not alive(pid), "the process outlived its channel")
    eventually(
        lambda: record_of(api, instance.id).commands[0].exit_status == -signal.SIGKILL,
        "the killed command was not recorded",
    )


def test_delete_kills_processes_and_removes_home(api: httpx.Client) -> None:
    instance = launch(api)
    pid = int(ssh_run(instance, "sleep 30 >/dev/null 2>&1 & echo $!").stdout)
    home = Path(str(record_of(api, instance.id).home))
    assert alive(pid)
    assert home.is_dir()
    api.delete(f"/v1/instances/{instance.id}")
    wait_for(api, instance.id, "terminated")
    eventually(lambda: not alive(pid), "a process outlived its instance")
    assert not home.exists()


def test_stop_ends_every_instance() -> None:
    server = SimServer(SimConfig(boot_delay_s=0.01))
    with httpx.Client(base_url=server.start(), headers=AUTH) as client:
        instance = launch(client)
        pid = int(ssh_run(instance, "sleep 30 >/dev/null 2>&1 & echo $!").stdout)
        home = Path(str(record_of(client, instance.id).home))
        server.stop()
        server.stop()
        eventually(lambda: not alive(pid), "a process outlived the sim")
        assert not home.exists()
        with pytest.raises(httpx.ConnectError):
            client.get("/v1/gpu-types")


# Faults


def test_http_error_fault_then_normal(api: httpx.Client) -> None:
    add_faults(
        api,
        {
            "kind": "http_error",
            "op": "create",
            "gpu_type": "H100",
            "status": 500,
            "code": "internal",
        },
        {
            "kind": "http_error",
            "op": "create",
            "status": 429,
            "code": "rate_limited",
            "retry_after": 2,
        },
    )
    limited = create(api)  # a T4: the H100 rule does not match
    assert (limited.status_code, limited.headers["retry-after"]) == (429, "2")
    assert error_code(limited) == "rate_limited"
    assert create(api).status_code == 201
    assert create(api, gpu_type="H100").status_code == 500
    assert create(api, gpu_type="H100").status_code == 201
    assert api.get("/_sim/faults").json() == {"faults": []}


def test_http_error_after_create_then_retry_finds_it(api: httpx.Client) -> None:
    add_faults(api, {"kind": "http_error_after"})
    session = secrets.token_hex(4)
    lost = create(api, client_token="token-after-1", labels={"session": session})
    assert (lost.status_code, error_code(lost)) == (500, "internal")
    retried = create(api, client_token="token-after-1", labels={"session": session})
    assert retried.status_code == 201
    listed = api.get("/v1/instances", params={"label": f"session={session}"}).json()
    assert [item["id"] for item in listed] == [retried.json()["id"]]


def test_slow_fault(api: httpx.Client) -> None:
    add_faults(api, {"kind": "slow", "op": "gpu_types", "delay_s": 0.3})
    started = time.monotonic()
    assert api.get("/v1/gpu-types").status_code == 200
    assert time.monotonic() - started >= 0.3


def test_malformed_fault(api: httpx.Client) -> None:
    add_faults(api, {"kind": "malformed", "op": "gpu_types", "body": '[{"name": "T4", '})
    answer = api.get("/v1/gpu-types")
    assert (answer.status_code, answer.text) == (200, '[{"name": "T4", ')


def test_override_fault(api: httpx.Client) -> None:
    instance_id = create(api).json()["id"]
    hostile = {"ip": "127.0.0.1; rm -rf ~", "id": "../../etc"}
    add_faults(api, {"kind": "override", "op": "get", "fields": hostile, "times": None})
    for _ in range(2):
        answer = api.get(f"/v1/instances/{instance_id}").json()
        assert (answer["ip"], answer["id"], answer["gpu_type"]) == (*hostile.values(), "T4")


def test_ignore_delete_fault(api: httpx.Client) -> None:
    instance = launch(api)
    add_faults(api, {"kind": "ignore_delete", "times": None})
    for _ in range(2):
        assert api.delete(f"/v1/instances/{instance.id}").status_code == 202
    time.sleep(0.1)
    assert api.get(f"/v1/instances/{instance.id}").json()["status"] == "running"
    api.delete("/_sim/faults")
    api.delete(f"/v1/instances/{instance.id}")
    wait_for(api, instance.id, "terminated")


def test_boot_never_and_boot_fail(api: httpx.Client) -> None:
    add_faults(api, {"kind": "boot_never"}, {"kind": "boot_fail", "gpu_type": "L4"})
    never = create(api).json()["id"]
    failed = create(api, gpu_type="L4").json()["id"]
    wait_for(api, failed, "failed")
    assert api.get(f"/v1/instances/{never}").json()["status"] == "provisioning"
    assert {never, failed} <= {item["id"] for item in api.get("/v1/instances").json()}
    launch(api, gpu_type="L4")  # the rules are used up
    for instance_id in (never, failed):
        api.delete(f"/v1/instances/{instance_id}")
        wait_for(api, instance_id, "terminated")


def test_wrong_host_key_fault(api: httpx.Client) -> None:
    add_faults(api, {"kind": "wrong_host_key"})
    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        ssh_run(launch(api), "true")


def test_ssh_refuse_fault(api: httpx.Client) -> None:
    add_faults(api, {"kind": "ssh_refuse"})
    with pytest.raises(ConnectionRefusedError):
        ssh_run(launch(api), "true")


def test_drop_ssh_after_commands(api: httpx.Client) -> None:
    add_faults(api, {"kind": "drop_ssh", "after_commands": 2, "after_s": 0.1})
    instance = launch(api)

    async def two_commands() -> int | None:
        async with asyncssh.connect(**ssh_options(instance)) as conn:
            assert (await conn.run("echo one")).stdout == "one\n"
            return (await conn.run("sleep 30")).exit_status

    started = time.monotonic()
    assert asyncio.run(two_commands()) is None
    assert time.monotonic() - started < 5
    assert api.get(f"/v1/instances/{instance.id}").json()["status"] == "running"
    assert ssh_run(instance, "echo back").stdout == b"back\n"
    eventually(
        lambda: record_of(api, instance.id).commands[1].exit_status == -signal.SIGKILL,
        "the dropped command was not killed",
    )


def test_drop_ssh_after_seconds(api: httpx.Client) -> None:
    add_faults(api, {"kind": "drop_ssh", "after_s": 0.3})
    instance = launch(api)
    started = time.monotonic()
    assert ssh_run(instance, "sleep 30").exit_status is None
    assert time.monotonic() - started < 5
    assert ssh_run(instance, "echo back").stdout == b"back\n"


def test_preempt_fault(api: httpx.Client) -> None:
    add_faults(api, {"kind": "preempt", "after_s": 0.3})
    instance = launch(api)
    assert ssh_run(instance, "sleep 30").exit_status is None
    wait_for(api, instance.id, "terminated")
    record = record_of(api, instance.id)
    assert (record.termination_reason, record.deleted_at) == ("preempted", None)
    assert not Path(str(record.home)).exists()
    with pytest.raises(ConnectionRefusedError):
        ssh_run(instance, "true")


def test_drop_ssh_and_preempt_when_a_file_appears(api: httpx.Client) -> None:
    add_faults(
        api,
        {"kind": "drop_ssh", "on_file": "drop-now"},
        {"kind": "preempt", "on_file": "lose-me", "gpu_type": "L4"},
    )
    dropped, lost = launch(api), launch(api, gpu_type="L4")
    assert ssh_run(dropped, "sleep 0.3 && touch drop-now && sleep 30").exit_status is None
    assert ssh_run(dropped, "echo back").stdout == b"back\n"
    assert ssh_run(lost, "echo still here").stdout == b"still here\n"
    assert ssh_run(lost, "touch lose-me && sleep 30").exit_status is None
    wait_for(api, lost.id, "terminated")
    assert record_of(api, lost.id).termination_reason == "preempted"
    assert api.get(f"/v1/instances/{dropped.id}").json()["status"] == "running"
    api.delete(f"/v1/instances/{dropped.id}")
    wait_for(api, dropped.id, "terminated")


def test_bad_fault_rules_are_refused(api: httpx.Client) -> None:
    for rule in (
        {"kind": "nope"},
        {"kind": "drop_ssh"},
        {"kind": "slow"},
        {"kind": "preempt"},
        {"kind": "preempt", "after_s": 1, "on_file": "x"},
        {"kind": "drop_ssh", "after_s": 1, "on_file": "x"},
        {"kind": "drop_ssh", "on_file": "../x"},
    ):
        answer = api.post("/_sim/faults", json={"faults": [rule]})
        assert (answer.status_code, error_code(answer)) == (422, "invalid_request")
    assert api.get("/_sim/faults").json() == {"faults": []}


# python -m pytest_gpucloud.sim


def test_standalone_sim_makes_a_key_and_serves_until_sigterm() -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "pytest_gpucloud.sim", "--port", "0", "--boot-delay", "0.01"],
        stdout=subprocess.PIPE,
    ) as proc:
        try:
            line, said = _first_lines(proc, 2)
            assert "instances run tests on this machine's CPU" in line
            match = re.search(r"http://127\.0\.0\.1:\d+", line)
            assert match is not None, line
            assert said.startswith("gpu-cloud sim: its API key (GPUCLOUD_API_KEY): "), said
            key = said.rsplit(" ", 1)[1]
            # Started without --api-key, it accepts no other token, on the admin API neither.
            for path in ("/v1/gpu-types", "/_sim/instances", "/_sim/faults"):
                assert httpx.get(match.group() + path, headers=AUTH).status_code == 401
            with httpx.Client(
                base_url=match.group(), headers={"Authorization": f"Bearer {key}"}
            ) as client:
                instance = launch(client)
                home = Path(str(record_of(client, instance.id).home))
                assert home.is_dir()
        finally:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert not home.exists()


def _first_lines(proc: subprocess.Popen[bytes], count: int) -> list[str]:
    """The first ``count`` lines ``proc`` prints (fewer if it prints no more for 5 s)."""
    assert proc.stdout is not None
    out = b""
    deadline = time.monotonic() + 20
    while out.count(b"\n") < count and select.select([proc.stdout], [], [], 5)[0]:
        out += os.read(proc.stdout.fileno(), 4096)
        assert time.monotonic() < deadline
    lines = out.decode().splitlines()
    return [*lines, *[""] * count][:count]


def test_standalone_sim_refuses_a_remote_host() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest_gpucloud.sim", "--host", "0.0.0.0", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1
    assert "--allow-remote" in done.stderr


def test_forwarding_reaches_the_instances_loopback_and_home_only(
    api: httpx.Client, tmp_path: Path
) -> None:
    # gpu_service forwards to a server on the instance; nothing else is reachable through it
    instance = launch(api)
    home = Path(str(record_of(api, instance.id).home))

    async def attempts() -> list[str]:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.read(100))
            await writer.drain()
            writer.close()

        tcp = await asyncio.start_server(echo, "0.0.0.0", 0)
        inside = await asyncio.start_unix_server(echo, str(home / "in.sock"))
        outside = await asyncio.start_unix_server(echo, str(tmp_path / "out.sock"))
        port = tcp.sockets[0].getsockname()[1]
        results = []
        async with asyncssh.connect(**ssh_options(instance)) as conn:
            targets: list[tuple[str, int] | str] = [
                ("127.0.0.1", port),
                str(home / "in.sock"),
                # this machine by its name: reachable, but not as the instance's loopback
                (socket.gethostname(), port),
                str(tmp_path / "out.sock"),
            ]
            for target in targets:
                try:
                    if isinstance(target, str):
                        reader, writer = await conn.open_unix_connection(target)
                    else:
                        reader, writer = await conn.open_connection(*target)
                except asyncssh.ChannelOpenError:
                    results.append("refused")
                    continue
                writer.write(b"ping")
                results.append((await reader.read(100)).decode())
                writer.close()
        for server in (tcp, inside, outside):
            server.close()
        return results

    assert asyncio.run(attempts()) == ["ping", "ping", "refused", "refused"]
