"""OpenSSH and rsync for the baselines: a private ``sshd`` on 127.0.0.1, started and stopped
by the benchmark itself.

:func:`ensure_tools` installs ``openssh-server`` and ``rsync`` from Debian's packages when
they are missing (``apt-get update`` once first; root only). :class:`LocalSshd` runs
``sshd -D`` on a free port with its own host key, ``authorized_keys`` and config in a
temporary directory (the system's ssh configuration is never read or changed) and gives the
``ssh`` command line that reaches it.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

SSHD = "/usr/sbin/sshd"
PACKAGES = {"sshd": "openssh-server", "ssh": "openssh-client", "rsync": "rsync"}


class ToolsMissing(RuntimeError):
    """The baselines cannot run here; the message says why and what to do."""


def _missing() -> list[str]:
    found = {"sshd": os.path.exists(SSHD), "ssh": bool(shutil.which("ssh"))}
    found["rsync"] = bool(shutil.which("rsync"))
    return [PACKAGES[tool] for tool, ok in found.items() if not ok]


def ensure_tools() -> None:
    """Install what the baselines need, or raise :class:`ToolsMissing` saying why not."""
    missing = _missing()
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ToolsMissing(
            f"the OpenSSH/rsync baselines need {' '.join(missing)}: install them "
            f"(apt-get install {' '.join(missing)}) or run make bench as root on Debian"
        )
    print(f"bench: installing {' '.join(missing)} from Debian's packages", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
    ):
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise ToolsMissing(f"{' '.join(command)} failed: {' / '.join(tail)}")
    if still := _missing():
        raise ToolsMissing(f"still missing after apt-get install: {' '.join(still)}")


class LocalSshd:
    """``sshd`` on 127.0.0.1:<free port> for the current user, key auth only."""

    def __init__(self, environment: Mapping[str, str] | None = None) -> None:
        """``environment``: variables every session gets (sshd's ``SetEnv``); HOME and PATH
        included, and bash then reads that HOME's ``.bashrc``."""
        self.environment = dict(environment or {})
        self.dir = Path(tempfile.mkdtemp(prefix="gpucloud-bench-sshd-"))
        self.user = pwd.getpwuid(os.geteuid()).pw_name
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def ssh_command(self) -> list[str]:
        """``ssh`` with this server's key, port and pinned host key; no user config."""
        return [
            "ssh",
            "-F",
            "/dev/null",
            "-i",
            str(self.dir / "client_key"),
            "-p",
            str(self.port),
            "-o",
            f"UserKnownHostsFile={self.dir / 'known_hosts'}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
        ]

    @property
    def rsh(self) -> str:
        """The ``ssh`` command line as one string, for ``rsync -e``."""
        return shlex.join(self.ssh_command)

    @property
    def target(self) -> str:
        return f"{self.user}@127.0.0.1"

    def start(self) -> LocalSshd:
        for name in ("host_key", "client_key"):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.dir / name)],
                check=True,
            )
        (self.dir / "authorized_keys").write_bytes((self.dir / "client_key.pub").read_bytes())
        self.port = _free_port()
        host_key = (self.dir / "host_key.pub").read_text().split()
        (self.dir / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {' '.join(host_key[:2])}\n")
        (self.dir / "sshd_config").write_text(
            "\n".join(
                [
                    "ListenAddress 127.0.0.1",
                    f"Port {self.port}",
                    f"HostKey {self.dir / 'host_key'}",
                    f"AuthorizedKeysFile {self.dir / 'authorized_keys'}",
                    f"PidFile {self.dir / 'sshd.pid'}",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PubkeyAuthentication yes",
                    "PermitRootLogin prohibit-password",
                    "StrictModes no",
                    "UsePAM no",
                    "UseDNS no",
                    "Subsystem sftp internal-sftp",
                    *self._setenv(),
                    "",
                ]
            )
        )
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation
        self._proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(self.dir / "sshd_config")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._wait_ready()
        return self

    def _setenv(self) -> list[str]:
        """The ``SetEnv`` line, if any: one, as sshd takes the first only."""
        pairs = [f'"{name}={value}"' for name, value in self.environment.items()]
        return [f"SetEnv {' '.join(pairs)}"] if pairs else []

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode() if self._proc.stderr else ""
                raise ToolsMissing(f"sshd exited at start: {err.strip()[-300:]}")
            done = subprocess.run(
                [*self.ssh_command, self.target, "true"], capture_output=True, check=False
            )
            if done.returncode == 0:
                return
            time.sleep(0.1)
        self.stop()
        raise ToolsMissing("sshd on 127.0.0.1 did not accept the benchmark's key within 10 s")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalSshd:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def versions() -> str:
    """``OpenSSH_9.2p1, rsync 3.2.7``: what the baselines ran with."""
    ssh = subprocess.run(["ssh", "-V"], capture_output=True, text=True, check=False).stderr
    rsync = subprocess.run(["rsync", "--version"], capture_output=True, text=True, check=False)
    words = rsync.stdout.split()
    return f"{ssh.split(',')[0].strip()}, rsync {words[2] if len(words) > 2 else '?'}"
