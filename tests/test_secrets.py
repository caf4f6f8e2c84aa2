"""The API key never leaves this machine's process, and allow-listed variables reach only
the remote tests: a canary key is looked for in everything a session leaves behind."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import httpx
import pytest

from pytest_gpucloud.config.settings import resolve
from pytest_gpucloud.sim import SimConfig, SimServer
from tests.cloud import GpuRun

# Recognisable; the remote tests (whose source and bytecode are synced) never spell it out.
CANARY_PREFIX = "gpucloud-canary-"

REMOTE_TESTS = """
import os
import pathlib

import pytest

pytestmark = pytest.mark.gpu("T4")
PREFIX = "-".join(["gpucloud", "canary", ""])  # no constant the compiler folds


def test_only_allowed_variables_arrive():
    assert "GPUCLOUD_API_KEY" not in os.environ
    assert os.environ["HF_TOKEN"] == "hf-value"
    assert "NOT_ALLOWED" not in os.environ
    assert "WANDB_API_KEY" not in os.environ  # only test_marker_env asked for it


@pytest.mark.gpu("T4", env="WANDB_API_KEY")
def test_marker_env():
    assert os.environ["WANDB_API_KEY"] == "wandb-value"


def test_key_is_nowhere_on_the_instance():
    for name, value in os.environ.items():
        assert PREFIX not in value, name
    for what in ("cmdline", "environ"):  # the worker's own, as it was started
        assert PREFIX.encode() not in pathlib.Path(f"/proc/self/{what}").read_bytes()
    for path in pathlib.Path.home().rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert PREFIX.encode() not in path.read_bytes(), path


def test_fails_loudly():
    raise AssertionError("a failure report travels back")
"""


@pytest.fixture
def canary() -> str:
    return CANARY_PREFIX + secrets.token_hex(12)


@pytest.fixture
def canary_sim(canary: str) -> Iterator[SimServer]:
    """A simulated cloud of its own whose only accepted key is the canary."""
    with SimServer(SimConfig(api_key=canary, boot_delay_s=0.05)) as server:
        yield server


def records(server: SimServer, key: str, path: str) -> str:
    assert server.url is not None
    response = httpx.get(server.url + path, headers={"Authorization": f"Bearer {key}"})
    response.raise_for_status()
    return response.text


def files_containing(root: Path, text: str) -> list[Path]:
    return [
        path
        for path in root.rglob("*")
        if path.is_file() and not path.is_symlink() and text.encode() in path.read_bytes()
    ]


def test_canary_key_is_in_no_output_report_log_instance_or_file(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    canary: str,
    canary_sim: SimServer,
) -> None:
    assert canary_sim.url is not None
    monkeypatch.setenv("GPUCLOUD_API_KEY", canary)
    monkeypatch.setenv("HF_TOKEN", "hf-value")
    monkeypatch.setenv("WANDB_API_KEY", "wandb-value")
    monkeypatch.setenv("NOT_ALLOWED", "other-value")
    pytester.makepyfile(test_remote=REMOTE_TESTS)
    result = pytester.runpytest_subprocess(
        "--gpu-cloud",
        "--gpu-api-url",
        canary_sim.url,
        "--gpu-env",
        "HF_TOKEN",
        "-vv",
        "-rA",
        "--junitxml=report.xml",
        "--log-level=DEBUG",
        "--log-file=session.log",
        "--log-file-level=DEBUG",
        "-o",
        "log_cli=true",
        "--log-cli-level=DEBUG",
        timeout=120,
    )
    result.assert_outcomes(passed=3, failed=1)
    assert "a failure report travels back" in result.stdout.str()
    assert (pytester.path / "session.log").stat().st_size > 0
    everything = result.stdout.str() + result.stderr.str()
    assert CANARY_PREFIX not in everything
    assert files_containing(pytester.path, CANARY_PREFIX) == []
    instances = records(canary_sim, canary, "/_sim/instances")
    assert "gpucloud_remote" in instances
    assert CANARY_PREFIX not in instances  # remote command lines and environments
    for value in ("hf-value", "wandb-value"):
        assert value not in instances
    assert CANARY_PREFIX not in records(canary_sim, canary, "/_sim/requests")
    for value in ("hf-value", "wandb-value", "other-value"):
        assert value not in everything, "an allow-listed value was shown"


def test_a_refused_key_is_named_but_never_shown(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, canary_sim: SimServer
) -> None:
    assert canary_sim.url is not None
    wrong = CANARY_PREFIX + "wrong-" + secrets.token_hex(8)
    monkeypatch.setenv("GPUCLOUD_API_KEY", wrong)
    pytester.makepyfile("import pytest\n\n@pytest.mark.gpu('T4')\ndef test_a():\n    pass\n")
    result = pytester.runpytest_subprocess(
        "--gpu-cloud", "--gpu-api-url", canary_sim.url, "--junitxml=report.xml", timeout=60
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*refused the API key*check GPUCLOUD_API_KEY*"])
    assert CANARY_PREFIX not in result.stdout.str() + result.stderr.str()
    assert files_containing(pytester.path, CANARY_PREFIX) == []


def test_settings_never_show_the_key(canary: str) -> None:
    settings = resolve(lambda dest: None, lambda name: None, {"GPUCLOUD_API_KEY": canary})
    assert settings.api_key is not None
    assert settings.api_key.get_secret_value() == canary
    for shown in (repr(settings), str(settings), settings.model_dump_json(), str(vars(settings))):
        assert CANARY_PREFIX not in shown


def test_ssh_reads_no_user_config_agent_or_known_hosts_and_writes_no_key(
    gpu_run: GpuRun, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pytester's HOME is the project: ~/.ssh would send every connection astray if read.
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    ssh_dir = pytester.path / ".ssh"
    ssh_dir.mkdir()
    (ssh_dir / "config").write_text("Host *\n    Port 1\n    User nobody\n")
    (ssh_dir / "known_hosts").write_text(f"127.0.0.1 {other}[127.0.0.1]:* {other}")
    monkeypatch.setenv("SSH_AUTH_SOCK", str(pytester.path / "no-agent.sock"))
    pytester.makepyfile(
        """
        import os
        import pytest

        @pytest.mark.gpu("T4")
        def test_remote():
            assert "SSH_AUTH_SOCK" not in os.environ  # no agent forwarded
        """
    )
    gpu_run().assert_outcomes(passed=1)
    assert files_containing(pytester.path, "PRIVATE KEY") == []


@pytest.mark.parametrize(
    ("cli", "ini", "environ"),
    [
        (["HF_TOKEN", "WANDB_API_KEY,HF_TOKEN"], None, {}),
        (None, ["HF_TOKEN", "WANDB_API_KEY"], {}),
        (None, ["OTHER"], {"GPUCLOUD_ENV": "WANDB_API_KEY, HF_TOKEN"}),
    ],
)
def test_allow_list_comes_from_option_ini_or_environment(
    cli: list[str] | None, ini: list[str] | None, environ: dict[str, str]
) -> None:
    settings = resolve(
        lambda dest: cli if dest == "gpu_cloud_opt_env" else None,
        lambda name: ini if name == "gpu_cloud_env" else None,
        environ,
    )
    assert settings.env == ("HF_TOKEN", "WANDB_API_KEY")
