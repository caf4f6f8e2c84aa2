"""The plugin against pytest-xdist over SSH, both reaching the SAME private OpenSSH sshd.

The plugin's ``ssh`` provider (a static host: a new user's GPU box, or a cloud VM once it
runs) and ``pytest -d --tx ssh=... --rsyncdir``, execnet over ``ssh``, what people used
before, go to one ``sshd`` on 127.0.0.1 (sshd.py) whose sessions find this environment's
``python3`` (pytest and xdist in it) and keep their home in the benchmark's scratch
folder. Runs alternate; a local run of the same tests is the floor.

- Per-test overhead: the trivial tests of overhead.py at 200, 2,000 and 20,000, the span
  from the end of the first test to the end of the last (overhead.per_test_ms), less the
  local span, per test.
- Session start: one trivial test in the mixed tree of openssh.py (2,000 files, 51 MB),
  from the pytest process's start to its first result: cold (nothing of the project on the
  host) and warm (a second session: our kept workspace, xdist's ``~/pyexecnetcache``).
  Ours also from the host being reachable (``ready_to_first_result`` in ``--gpu-report``).
- Login shells: the warm start again where each remote command first waits 0.2 s
  (``BASH_ENV`` naming a ``sleep 0.2``, as a ``.bashrc`` running ``pyenv init`` does); the
  same script counts the remote commands each tool opens.

Run: ``python bench/xdist_ssh.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from openssh import make_tree
from overhead import QUIET, SIZES, make_project, per_test_ms
from sshd import LocalSshd, ToolsMissing, ensure_tools

STANDINS = Path(__file__).resolve().parent.parent / "tests" / "standins"
REPEATS = 3
SLOW_SHELL_S = 0.2
OVERHEAD_TARGET_MS = 0.5
TOOLS = ("ours", "xdist")
NOTES: list[str] = []

FIRST_RESULT = """
import os
import time


def pytest_runtest_logfinish(nodeid, location):
    out = os.environ.get("BENCH_FIRST")
    if out and not os.path.exists(out):
        with open(out, "w") as f:
            f.write(repr(time.time()))
"""


class Host:
    """A private sshd as a static GPU host (a stand-in nvidia-smi shows one T4), and the
    command lines of both tools for it. Its sessions' home is a folder of the benchmark's,
    whose ``.bashrc`` counts each remote command, waits ``shell_delay_s`` and goes home."""

    def __init__(self, scratch: Path, shell_delay_s: float = 0.0) -> None:
        scratch.mkdir(parents=True, exist_ok=True)
        self.home = scratch / "home"
        self.commands = scratch / "commands.log"
        # cd: sshd starts a session in the passwd entry's home, not in HOME's.
        self.bashrc = f'echo started >> {self.commands}\nsleep {shell_delay_s}\ncd "$HOME"\n'
        path = [Path(sys.executable).parent, STANDINS, "/usr/local/bin", "/usr/bin", "/bin"]
        environment = {
            "PATH": ":".join(map(str, path)),
            "HOME": str(self.home),
            "STANDIN_NVIDIA_GPUS": "GPU-bench-0|Tesla T4|15360",
        }
        self.sshd = LocalSshd(environment)

    def __enter__(self) -> Host:
        self.forget()
        self.sshd.start()
        self.forget()  # less the command that saw sshd ready
        return self

    def __exit__(self, *exc: object) -> None:
        self.sshd.stop()

    def forget(self) -> None:
        """Nothing of either tool left on the host (a cold start), and no command counted."""
        shutil.rmtree(self.home, ignore_errors=True)
        self.home.mkdir(parents=True)
        (self.home / ".bashrc").write_text(self.bashrc)
        self.commands.unlink(missing_ok=True)

    def commands_since_forget(self) -> int:
        return len(self.commands.read_text().splitlines()) if self.commands.exists() else 0

    def args(self, tool: str) -> list[str]:
        sshd = self.sshd
        if tool == "ours":
            return [
                "--gpu-cloud",
                "--gpu-provider=ssh",
                f"--gpu-hosts={sshd.user}@127.0.0.1:{sshd.port}=T4",
                f"--gpu-known-hosts={sshd.dir / 'known_hosts'}",
                f"--gpu-ssh-key={sshd.dir / 'client_key'}",
            ]
        options = " ".join(sshd.ssh_command[3:])  # less "ssh -F /dev/null": execnet's own
        spec = f"ssh={options} {sshd.target}//python=python3//ssh_config=/dev/null"
        return ["-p", "no:gpucloud", "-d", "--tx", spec, "--rsyncdir=.", "-W", "ignore"]


def _pytest(root: Path, args: list[str], env: dict[str, str]) -> str:
    # Bytecode cached, as on a user's machine: both tools then start from .pyc files.
    env = {name: value for name, value in env.items() if name != "PYTHONDONTWRITEBYTECODE"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", *QUIET, *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
        raise RuntimeError(f"pytest {' '.join(args)} failed:\n" + "\n".join(tail))
    return done.stdout


def _span(root: Path, args: list[str]) -> dict[str, Any]:
    out = root / ".span.json"
    out.unlink(missing_ok=True)
    _pytest(root, args, {**os.environ, "BENCH_SPAN": str(out)})
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def overhead(host: Host, root: Path) -> list[dict[str, Any]]:
    """Per-test overhead over the local run, ours and xdist's, at each size."""
    make_project(root)
    rows = []
    for size in SIZES:
        tests = str(root / f"test_n{size}.py")  # absolute: xdist's rsync roots want it
        local = per_test_ms(_span(root, ["-p", "no:gpucloud", tests]))
        over = {tool: per_test_ms(_span(root, [*host.args(tool), tests])) - local for tool in TOOLS}
        print(f"xdist_ssh: {size:,} tests: local {local:.3f} ms/test, overhead {over}", flush=True)
        ok = over["ours"] <= min(over["xdist"], OVERHEAD_TARGET_MS)
        rows.append(
            _row(
                f"per-test overhead over a local run, {size:,} trivial tests (baseline: "
                "pytest-xdist over SSH)",
                over["ours"],
                over["xdist"],
                f"<= xdist and <= {OVERHEAD_TARGET_MS} ms",
                ok,
                "ms",
            )
        )
    return rows


def _first_result(host: Host, root: Path, tool: str, report: Path | None = None) -> float:
    """Seconds from the pytest process's start to its first result."""
    out = root / ".first"
    out.unlink(missing_ok=True)
    args = host.args(tool) + ([f"--gpu-report={report}"] if report else [])
    os.sync()
    started = time.time()
    _pytest(root, [*args, str(root / "test_first.py")], {**os.environ, "BENCH_FIRST": str(out)})
    return float(out.read_text()) - started


def session_starts(host: Host, root: Path) -> dict[str, list[float]]:
    """Cold and warm starts of each tool, alternating; ours also from reachable."""
    times: dict[str, list[float]] = {}
    report = root / ".report.json"
    for repeat in range(REPEATS):
        for tool in TOOLS if repeat % 2 == 0 else TOOLS[::-1]:
            host.forget()
            times.setdefault(f"{tool} cold", []).append(_first_result(host, root, tool))
            warm = _first_result(host, root, tool, report if tool == "ours" else None)
            times.setdefault(f"{tool} warm", []).append(warm)
            if tool == "ours":
                (instance,) = json.loads(report.read_text())["instances"]
                reachable = instance["phases"]["ready_to_first_result"]
                times.setdefault("ours warm, reachable", []).append(reachable)
    return times


def slow_shell_starts(scratch: Path, root: Path) -> dict[str, Any]:
    """Warm starts where each remote command waits first, and the commands each opened."""
    found: dict[str, Any] = {}
    with Host(scratch / "slow", SLOW_SHELL_S) as host:
        for tool in TOOLS:
            host.forget()
            _first_result(host, root, tool)  # the cold session: the workspace is warm now
            best = []
            for _ in range(REPEATS):
                host.commands.unlink(missing_ok=True)
                best.append(_first_result(host, root, tool))
            found[tool] = min(best)
            found[f"{tool} commands"] = host.commands_since_forget()
    return found


def _start_project(root: Path) -> tuple[int, int]:
    root.mkdir(parents=True)
    files, size = make_tree(root, "mixed")
    (root / "conftest.py").write_text(FIRST_RESULT)
    (root / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: a GPU test\n")
    (root / "test_first.py").write_text(
        'import pytest\n\n\n@pytest.mark.gpu("T4")\ndef test_first():\n    pass\n'
    )
    return files, size


def main() -> list[dict[str, Any]]:
    try:
        ensure_tools()
    except ToolsMissing as exc:
        NOTES.append(f"Skipped: {exc}.")
        return []
    scratch = Path(tempfile.mkdtemp(prefix="gpucloud-bench-xdist-", dir="/var/tmp"))
    try:
        tree = scratch / "tree"
        files, size = _start_project(tree)
        with Host(scratch / "plain") as host:
            rows = overhead(host, scratch / "project")
            starts = session_starts(host, tree)
        slow = slow_shell_starts(scratch, tree)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    best = {name: min(values) for name, values in starts.items()}
    where = f"{files:,} files, {size / 1e6:.0f} MB"
    for kind in ("cold", "warm"):
        rows.append(
            _row(
                f"session start to first result, {kind} host, {where} (baseline: xdist {kind})",
                best[f"ours {kind}"],
                best[f"xdist {kind}"],
                "<= 1.0x",
                best[f"ours {kind}"] <= best[f"xdist {kind}"],
                "s",
            )
        )
    rows.append(
        _row(
            f"host reachable to first result, warm, {where} (baseline: xdist warm, start to "
            "first result)",
            best["ours warm, reachable"],
            best["xdist warm"],
            "<= 1.0x",
            best["ours warm, reachable"] <= best["xdist warm"],
            "s",
        )
    )
    rows.append(
        _row(
            f"session start to first result, warm, every remote command {SLOW_SHELL_S} s "
            f"slower to start (ours opened {slow['ours commands']}, xdist "
            f"{slow['xdist commands']}; baseline: xdist)",
            slow["ours"],
            slow["xdist"],
            "1 command",
            slow["ours commands"] <= 1,
            "s",
        )
    )
    medians = {name: sorted(values)[len(values) // 2] for name, values in starts.items()}
    NOTES.append(
        f"Session starts, best of {REPEATS}; medians: "
        + ", ".join(f"{name} {value:.3f} s" for name, value in medians.items())
        + f". With a {SLOW_SHELL_S} s shell start, the warm start grew by "
        f"{slow['ours'] - best['ours warm']:.2f} s for ours and "
        f"{slow['xdist'] - best['xdist warm']:.2f} s for xdist."
    )
    return rows


def _row(
    name: str, value: float, baseline: float, target: str, ok: bool, unit: str
) -> dict[str, Any]:
    return {
        "name": name,
        "value": round(value, 3),
        "baseline": round(baseline, 3),
        "ratio": round(value / baseline, 2) if baseline > 0 else None,
        "target": target,
        "ok": ok,
        "unit": unit,
    }


if __name__ == "__main__":
    for row in main():
        print(f"{row['name']}: {row['value']} vs {row['baseline']} {row['unit']} ({row['ok']})")
    print("\n\n".join(NOTES))
