"""What each built-in provider allows, checked before a session starts: host-key policies
and container runtimes. A combination that cannot work is a usage error.

Host-key policies, best first, per provider (README, "Host keys"):

- ``inject``: a host key made here goes onto the instance with the create call (Lambda's
  cloud-init user data, RunPod's environment and start command), so the first connection
  is already verified;
- ``announced``: the API announces the instance's host key (the ``rest`` API);
- ``tofu``: trust the key the first connection sees and pin it for the session; only where
  neither of the above exists, shown in the session header, refused by ``strict``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pytest_gpucloud.core.errors import ConfigError

if TYPE_CHECKING:
    from pytest_gpucloud.config.settings import Settings

Policy = Literal["inject", "announced", "tofu"]


@dataclass(frozen=True)
class Rules:
    """One provider's verified host-key policies (best first; none: only ``tofu``) and the
    runtimes its machines can run (``none``: the tests run on the machine itself)."""

    policies: tuple[Policy, ...]
    runtimes: tuple[str, ...]
    runtime_note: str


RULES: dict[str, Rules] = {
    "rest": Rules(("announced",), ("none", "docker", "podman", "apptainer"), ""),
    "sim": Rules(("announced",), ("none", "docker", "podman", "apptainer"), ""),
    "lambda": Rules(
        ("inject",),
        ("none", "docker"),
        "Lambda's VMs run Lambda Stack with docker and the NVIDIA container toolkit; use "
        "--gpu-runtime docker (with --gpu-image) or none",
    ),
    "runpod": Rules(
        ("inject",),
        ("none",),
        "a RunPod pod is itself a container of --gpu-image, with no container engine inside; "
        "use --gpu-runtime none",
    ),
    "lyceum": Rules(
        (),
        ("none", "docker"),
        "Lyceum's VMs run the tests themselves or in docker; use --gpu-runtime docker or none",
    ),
}


def host_key_policy(provider: str, settings: Settings) -> Policy | None:
    """The policy ``provider`` uses under ``--gpu-host-key``; None for a provider with its own
    (a plugin's, or ``local`` and ``ssh``, which read known_hosts). Raises ConfigError."""
    rules = RULES.get(provider)
    if rules is None:
        return None
    offered, asked = rules.policies, settings.host_key
    verified = " or ".join(offered)
    if asked is None:
        return offered[0] if offered else "tofu"
    if asked == "strict":
        if not offered:
            raise ConfigError(
                f"--gpu-host-key strict: provider {provider} can verify no SSH host key (it "
                "neither takes one nor announces one), so only tofu would connect; drop strict "
                "to accept trust on first use"
            )
        return offered[0]
    if asked == "tofu" and offered:
        raise ConfigError(
            f"--gpu-host-key tofu: provider {provider} verifies host keys ({verified}); tofu "
            "is allowed only where neither inject nor announced exists"
        )
    if asked != "tofu" and asked not in offered:
        raise ConfigError(
            f"--gpu-host-key {asked}: provider {provider} offers "
            f"{verified or 'no verified host key (only tofu)'}"
        )
    return asked


def check(provider: str, settings: Settings) -> None:
    """Raise ConfigError for a host-key policy or runtime ``provider`` cannot honour."""
    host_key_policy(provider, settings)
    rules = RULES.get(provider)
    if rules is not None and settings.runtime not in rules.runtimes:
        raise ConfigError(
            f"--gpu-runtime {settings.runtime} cannot work on provider {provider}: "
            f"{rules.runtime_note}"
        )


def header_note(provider: str, settings: Settings) -> str | None:
    """What the session header says about host keys where they are not verified."""
    if host_key_policy(provider, settings) == "tofu":
        return (
            f"host keys: trust on first use ({provider} neither takes nor announces one; "
            "each is pinned at the first connection)"
        )
    return None
