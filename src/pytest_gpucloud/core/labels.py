"""The labels every instance is created with: whose it is, and until when it may live.

``python -m pytest_gpucloud cleanup`` finds a project's instances by these labels. A cloud
without labels gets them in the instance's name instead, ``gpucloud-<session>-<expiry>``
(:func:`instance_name`), which holds the session and the expiry but not the project.
"""

from __future__ import annotations

import getpass
import re
import time
from collections.abc import Mapping

SESSION = "gpucloud-session"
PROJECT = "gpucloud-project"
OWNER = "gpucloud-owner"
# Epoch seconds after which the instance is stale: its max_lifetime_s has passed.
EXPIRES = "gpucloud-expires"

_LABEL_CHARS = re.compile(r"[^A-Za-z0-9._:@+-]")


def project_label(name: str) -> str:
    """A project's label value: its rootdir's name, in the characters labels allow."""
    return _LABEL_CHARS.sub("-", name)[:64] or "project"


def session_labels(session_id: str, project: str, lifetime_s: int) -> dict[str, str]:
    try:
        owner = getpass.getuser()
    except (KeyError, OSError):
        owner = "unknown"
    return {
        SESSION: session_id,
        PROJECT: project_label(project),
        OWNER: _LABEL_CHARS.sub("-", owner)[:64] or "unknown",
        EXPIRES: str(int(time.time()) + lifetime_s),
    }


def expires_at(labels: Mapping[str, str]) -> float | None:
    """When an instance with these labels expires; None if they do not say."""
    try:
        return float(labels[EXPIRES])
    except (KeyError, ValueError):
        return None


_NAME = re.compile(r"gpucloud-([0-9a-f]{1,32})-([0-9]{1,12})")


def instance_name(labels: Mapping[str, str]) -> str:
    """The name that carries ``labels``' session and expiry, for clouds without labels."""
    return f"gpucloud-{labels[SESSION]}-{labels[EXPIRES]}"


def from_name(name: str | None) -> dict[str, str]:
    """The labels an :func:`instance_name` carries; empty for any other name."""
    found = _NAME.fullmatch(name or "")
    return {SESSION: found[1], EXPIRES: found[2]} if found else {}


def selects(wanted: Mapping[str, str], carried: Mapping[str, str]) -> bool:
    """Whether an instance carrying ``carried`` is one of ``wanted``: a project instance
    (it has a session) whose labels agree with every wanted one it carries (a name holds
    no project or owner)."""
    return SESSION in carried and all(
        carried[key] == value for key, value in wanted.items() if key in carried
    )
