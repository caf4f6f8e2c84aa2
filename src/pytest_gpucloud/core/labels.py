"""The labels every instance is created with: whose it is, and until when it may live.

``python -m pytest_gpucloud cleanup`` finds a project's instances by these labels.
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
