"""Spot requests (grammar, offers, prices, cost report), name tags, and the host-key
policies: which each provider allows, and ``tofu``'s pinning over real SSH."""

from __future__ import annotations

import asyncio
import dataclasses

import asyncssh
import pytest

from pytest_gpucloud.config.settings import Settings, resolve
from pytest_gpucloud.core.catalog import GpuType, explain_infeasible, feasible_offers
from pytest_gpucloud.core.environment import env_name_fault
from pytest_gpucloud.core.errors import ConfigError, HostKeyMismatch, MarkerError
from pytest_gpucloud.core.labels import EXPIRES, PROJECT, SESSION, from_name, instance_name, selects
from pytest_gpucloud.core.request import parse_marker
from pytest_gpucloud.providers import vendors
from pytest_gpucloud.providers.base import Instance
from pytest_gpucloud.scheduling.cost import Bill
from pytest_gpucloud.session.summary import summary_lines
from pytest_gpucloud.sim.instances import SimMachine
from pytest_gpucloud.transport import ssh

H100 = GpuType("H100", 80, 3.0, True, ("eu",), spot_price_per_hour=1.1)
L40S = GpuType("L40S", 48, 1.2, True, ("eu",))


def test_a_spot_request_gets_spot_offers_at_spot_prices_only() -> None:
    request = parse_marker(("any",), {"spot": True})
    offers = feasible_offers(request, [H100, L40S])
    assert [(o.gpu.name, o.spot, o.price(2)) for o in offers] == [("H100", True, 2.2)]
    on_demand = feasible_offers(parse_marker(("H100",), {}), [H100])[0]
    assert on_demand.key != offers[0].key  # failover avoids the two apart


def test_no_spot_capacity_is_explained() -> None:
    request = parse_marker(("L40S",), {"spot": True})
    assert feasible_offers(request, [L40S]) == []
    assert "offers no spot capacity" in explain_infeasible(request, [L40S])


def test_spot_takes_a_bool_only() -> None:
    with pytest.raises(MarkerError, match="spot must be True or False"):
        parse_marker(("H100",), {"spot": "yes"})


def test_the_cost_report_marks_spot_instances() -> None:
    bill = Bill("i-1", "H100", 1, "eu", 1.1, 0.0, None, 10.0, 1, spot=True)
    assert "H100 spot" in summary_lines([bill])[0]


def test_a_name_carries_session_and_expiry_and_selects_by_them() -> None:
    labels = {SESSION: "0123456789ab", EXPIRES: "1900000000", PROJECT: "p"}
    carried = from_name(instance_name(labels))
    assert carried == {SESSION: "0123456789ab", EXPIRES: "1900000000"}
    assert selects({PROJECT: "p"}, carried)  # a name holds no project: it cannot disagree
    assert not selects({SESSION: "other"}, carried)
    assert from_name("my-own-pod") == {}
    assert not selects({}, from_name("my-own-pod"))


@pytest.mark.parametrize(
    ("provider", "asked", "policy"),
    [
        ("lambda", None, "inject"),
        ("runpod", "strict", "inject"),
        ("lyceum", None, "tofu"),
        ("lyceum", "tofu", "tofu"),
        ("rest", "announced", "announced"),
        ("sim", None, "announced"),
    ],
)
def test_the_policy_each_provider_uses(provider: str, asked: str | None, policy: str) -> None:
    settings = Settings.model_validate({"host_key": asked})
    assert vendors.host_key_policy(provider, settings) == policy


@pytest.mark.parametrize(
    ("provider", "asked", "said"),
    [
        ("lyceum", "strict", "can verify no SSH host key"),
        ("lambda", "tofu", "tofu is allowed only where neither"),
        ("rest", "inject", "offers announced"),
        ("lyceum", "inject", "only tofu"),
    ],
)
def test_a_policy_the_provider_cannot_honour_is_a_usage_error(
    provider: str, asked: str, said: str
) -> None:
    with pytest.raises(ConfigError, match=said):
        vendors.check(provider, Settings.model_validate({"host_key": asked}))


def test_tofu_pins_the_first_key_and_refuses_another() -> None:
    """Over real SSH: the first connection trusts and pins; a machine at the same address
    with another key is then refused."""
    client = asyncssh.generate_private_key("ssh-ed25519")

    async def scenario() -> None:
        first = SimMachine("i-a", "H100:1", client, None)
        second = SimMachine("i-b", "H100:1", client, None)
        try:
            instance = Instance(
                "i-a",
                "H100",
                1,
                "eu",
                1.0,
                "running",
                0.0,
                ip="127.0.0.1",
                ssh_port=await first.listen(),
                ssh_user="gpu",
                trust_first_host_key=True,
            )
            conn = await ssh.connect(instance, client, timeout=10)
            pinned = dataclasses.replace(instance, ssh_host_key=ssh.presented_host_key(conn))
            conn.close()
            assert pinned.ssh_host_key == first.host_key_text
            moved = dataclasses.replace(pinned, ssh_port=await second.listen())
            with pytest.raises(HostKeyMismatch):
                await ssh.connect(moved, client, timeout=10)
        finally:
            first.stop()
            second.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize("name", ["LAMBDA_API_KEY", "RUNPOD_API_KEY", "LYCEUM_API_KEY"])
def test_vendor_keys_never_travel_to_instances(name: str) -> None:
    assert env_name_fault(name) == "secret"
    with pytest.raises(ConfigError, match=f"{name} never travels"):
        resolve(lambda dest: None, lambda ini: None, {"GPUCLOUD_ENV": name})


def test_a_vendor_key_is_read_from_its_variable_and_never_shown() -> None:
    settings = resolve(lambda dest: None, lambda ini: None, {"LYCEUM_API_KEY": "lk_sekrit"})
    assert settings.vendor_keys["lyceum"].get_secret_value() == "lk_sekrit"
    assert "lk_sekrit" not in repr(settings) + str(settings)
