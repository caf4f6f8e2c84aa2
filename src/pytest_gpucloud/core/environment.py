"""Environment variables: the API keys', and the one check of a name tests may be given."""

from __future__ import annotations

import re
from typing import Literal

API_KEY_ENV = "GPUCLOUD_API_KEY"
# The vendor providers' keys, each under its vendor's conventional variable.
VENDOR_KEY_ENV = {
    "lambda": "LAMBDA_API_KEY",
    "runpod": "RUNPOD_API_KEY",
    "lyceum": "LYCEUM_API_KEY",
}
# Environment variables that no allow-list (--gpu-env, gpu(env=...)) may pass to instances.
SECRET_ENV = frozenset({API_KEY_ENV, *VENDOR_KEY_ENV.values()})
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def env_name_fault(name: str) -> Literal["not a name", "secret"] | None:
    """Why remote tests may not be given the variable ``name`` (None: they may)."""
    if _NAME.fullmatch(name) is None:
        return "not a name"
    if name in SECRET_ENV:
        return "secret"
    return None
