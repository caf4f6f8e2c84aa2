"""Files the sync never sends: secret-shaped names by default, and ``.gpucloudignore``.

Credential files land in checkouts untracked (``.env``, a key a CI step wrote, cloud
credentials), and git would list them as files it would track. So whatever git says, the
names below stay on this machine. ``.gpucloudignore`` at the project's root, in gitignore
syntax, adds exclusions, and ``!name`` sends a file the defaults keep back (its patterns
come after the defaults; the last match wins).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pathspec

IGNORE_FILE = ".gpucloudignore"

SECRET_PATTERNS = (
    # private keys and key stores
    "id_rsa",
    "id_dsa",
    "id_ecdsa",
    "id_ed25519",
    "id_ecdsa_sk",
    "id_ed25519_sk",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "*.jks",
    "*.keystore",
    "*.ppk",
    ".ssh/",
    # environment files
    ".env",
    ".env.*",
    "*.env",
    # credentials of tools and clouds
    ".netrc",
    "_netrc",
    ".git-credentials",
    ".pypirc",
    ".npmrc",
    ".aws/",
    ".azure/",
    ".config/gcloud/",
    "application_default_credentials.json",
    "*service-account*.json",
    ".docker/config.json",
    ".kube/config",
    "kubeconfig",
    "*.tfvars",
    ".terraformrc",
    "credentials.json",
    "secrets.json",
    ".htpasswd",
)


class Exclusions:
    """The defaults plus a project's ``.gpucloudignore``, matched against sync paths."""

    def __init__(self, extra_lines: Iterable[str] = ()) -> None:
        self._spec = pathspec.GitIgnoreSpec.from_lines([*SECRET_PATTERNS, *extra_lines])

    @classmethod
    def of(cls, root: Path) -> Exclusions:
        """The exclusions for the tree at ``root`` (its ``.gpucloudignore``, if any)."""
        try:
            lines = (root / IGNORE_FILE).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            lines = []
        return cls(lines)

    def excludes(self, name: str) -> bool:
        """Whether the posix path ``name`` (relative to the root) stays here."""
        return bool(self._spec.match_file(name))
