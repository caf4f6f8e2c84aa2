"""Finding 2 of the hostile-instance review: secret-shaped files never travel to an
instance, tracked by git or not, inside git or not; ``.gpucloudignore`` adds exclusions and
sends a file back in. A canary in each kind of file is looked for on the instance."""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

import pytest

from pytest_gpucloud.transport.exclusions import Exclusions
from pytest_gpucloud.transport.sync import left_behind, list_files
from tests.cloud import GpuRun

SECRET_FILES = (
    ".env",
    ".env.production",
    "deploy/prod.env",
    "id_rsa",
    "deploy/id_ed25519",
    "certs/server.pem",
    "certs/tls.key",
    "certs/client.p12",
    ".ssh/config",
    ".aws/credentials",
    ".azure/accessTokens.json",
    ".config/gcloud/application_default_credentials.json",
    "gcp-service-account.json",
    ".netrc",
    ".git-credentials",
    ".pypirc",
    ".npmrc",
    ".docker/config.json",
    ".kube/config",
    "infra/prod.tfvars",
    "credentials.json",
)

SCANS_WORKSPACE = """
import pathlib

import pytest

PREFIX = "-".join(["gpucloud", "canary", ""]).encode()


@pytest.mark.gpu("T4")
def test_no_canary_here():
    found = [
        str(path)
        for path in pathlib.Path.cwd().rglob("*")
        if path.is_file() and PREFIX in path.read_bytes()
    ]
    assert found == []
    assert pathlib.Path(".env.example").read_text() == "PUBLIC=1\\n"
    assert pathlib.Path("src/app.py").exists()
"""


def plant(root: Path, canary: str) -> None:
    for name in (*SECRET_FILES, "private/notes.txt"):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"-----BEGIN PRIVATE KEY-----\n{canary}\n")
    (root / ".env.example").write_text("PUBLIC=1\n")
    (root / "src").mkdir(exist_ok=True)
    (root / "src" / "app.py").write_text("VALUE = 1\n")
    (root / ".gpucloudignore").write_text("# ours\nprivate/\n!.env.example\n")


@pytest.mark.parametrize("vcs", ["git, half tracked", "no git"])
def test_a_canary_in_each_kind_of_secret_file_reaches_no_instance(
    gpu_run: GpuRun, pytester: pytest.Pytester, vcs: str
) -> None:
    canary = "gpucloud-canary-" + secrets.token_hex(8)
    plant(pytester.path, canary)
    pytester.makepyfile(test_scan=SCANS_WORKSPACE)
    if vcs.startswith("git"):
        subprocess.run(["git", "init", "-q"], cwd=pytester.path, check=True)
        tracked = [name for i, name in enumerate(SECRET_FILES) if i % 2]
        subprocess.run(["git", "add", "-f", *tracked], cwd=pytester.path, check=True)
    result = gpu_run("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [f"gpu-cloud: {len(SECRET_FILES) + 1} file(s) stayed on this machine*.env,*"]
    )


def test_the_exclusions_match_names_at_any_depth_and_opt_back_in(tmp_path: Path) -> None:
    exclusions = Exclusions(["!keep.pem", "data/*.bin"])
    assert exclusions.excludes("a/b/id_rsa")
    assert exclusions.excludes(".aws/credentials")
    assert not exclusions.excludes("id_rsa.pub")
    assert not exclusions.excludes("src/environment.py")
    assert not exclusions.excludes("keep.pem")
    assert exclusions.excludes("data/x.bin")
    (tmp_path / "id_rsa").write_text("k")
    (tmp_path / "a.py").write_text("")
    assert list_files(tmp_path) == ["a.py"]
    assert left_behind(tmp_path) == ["id_rsa"]
