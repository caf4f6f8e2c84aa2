"""Code sync into a private OpenSSH sshd, ours and rsync against the SAME server, on two links.

What a static host or a cloud VM runs is OpenSSH, so every figure here goes to one private
``sshd`` on 127.0.0.1 (sshd.py), its destination folders on disk, dirty pages written out
(``sync``) before each run, ours and the baselines alternating within each repeat:

- ours: :func:`pytest_gpucloud.transport.sync.sync` over the plugin's SSH client
  (asyncssh), connecting included, into an empty folder (``cold``), then, over a fresh
  connection and without local state, into the same folder again (``second session``:
  what a second session on a static host with a warm workspace does; the sync alone, as
  ``phases.sync`` counts it, since the lease's connection is open by then);
- ``rsync -a`` and ``rsync -az`` over ``ssh`` into an empty folder, then ``rsync -a`` again
  (no change), all with ``--exclude=.git``.

Two links: raw loopback, and 200 Mbit/s made with a ``tbf`` qdisc on the loopback of a
network namespace that the benchmark creates and removes (root only; the kernel here has
tbf, not netem, so no delay is added). Two trees: ``mixed`` (2,000 files, about 51 MB:
text files of 1-8 KB and ten random 4 MiB files) and ``text`` (600 text files of 20-120
lines and nine random 5 MB files). Both are git work trees; ``.git`` never travels.

Run: ``python bench/openssh.py`` (as root, for the limited link).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytest_gpucloud.core.sshlib import asyncssh
from pytest_gpucloud.transport import ssh
from pytest_gpucloud.transport.commands import ExecShell
from pytest_gpucloud.transport.sync import sync
from sshd import LocalSshd, ToolsMissing, ensure_tools, versions
from sync import best_row

REPEATS = 3
LIMITED = "200mbit"
COLD_TARGET = {"loopback": 1.0, LIMITED: 1.0}  # x rsync; on the limited link also x rsync -z
SECOND_SESSION_TARGET_S = 0.1
NOTES: list[str] = []
WORDS = ["model", "batch", "tensor", "loss", "grad", "step", "layer", "cache", "shape"]


def _text_file(rng: random.Random, lines: int) -> bytes:
    body = ['"""Generated module for the OpenSSH benchmark."""', "import math", ""]
    for _ in range(lines):
        body.append(
            f"x_{rng.choice(WORDS)}_{rng.randint(0, 9999)} = math.sqrt({rng.randint(1, 999)})"
            f"  # {rng.choice(WORDS)} {rng.random():.6f}"
        )
    return "\n".join(body).encode()


def make_tree(root: Path, shape: str, seed: int = 20) -> tuple[int, int]:
    """Write tree ``shape`` (``mixed`` or ``text``) under ``root``; (files, bytes)."""
    rng = random.Random(seed)
    files, total = [], 0
    if shape == "mixed":
        for n in range(1_990):
            data, size = _text_file(rng, 1), rng.randint(1_000, 8_000)
            while len(data) < size:
                data += b"\n" + _text_file(rng, 8)
            files.append((f"src/pkg{n % 40:02d}/mod{n:04d}.py", data))
        files += [(f"weights/shard{n}.dat", rng.randbytes(4 << 20)) for n in range(10)]
    else:
        for n in range(600):
            files.append(
                (f"src/pkg{n % 20:02d}/mod{n:04d}.py", _text_file(rng, rng.randint(20, 120)))
            )
        files += [(f"data/blob{n}.bin", rng.randbytes(5_000_000)) for n in range(9)]
    for name, data in files:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        total += len(data)
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run(["git", "-C", str(root), "add", "-A"], check=True)
    return len(files), total


def _flushed(run: Callable[[], float]) -> float:
    os.sync()
    return run()


class Runs:
    """The runs of one tree against one sshd; each returns its seconds."""

    def __init__(self, sshd: LocalSshd, tree: Path, scratch: Path) -> None:
        self.sshd, self.tree, self.scratch = sshd, tree, scratch

    def _fresh(self, name: str) -> Path:
        dest = self.scratch / name
        shutil.rmtree(dest, ignore_errors=True)
        Path(f"{dest}.manifest.json").unlink(missing_ok=True)
        return dest

    def rsync(self, name: str, *flags: str, fresh: bool = True) -> float:
        dest = self._fresh(name) if fresh else self.scratch / name
        command = ["rsync", *flags, "--exclude=.git", "-e", self.sshd.rsh, f"{self.tree}/"]
        started = time.perf_counter()
        subprocess.run([*command, f"{self.sshd.target}:{dest}/"], check=True)
        return time.perf_counter() - started

    async def ours(self, name: str, *, fresh: bool = True) -> float:
        dest = self._fresh(name) if fresh else self.scratch / name
        os.sync()
        started = time.perf_counter()
        conn = await asyncssh.connect(
            "127.0.0.1",
            self.sshd.port,
            username=self.sshd.user,
            client_keys=[str(self.sshd.dir / "client_key")],
            known_hosts=str(self.sshd.dir / "known_hosts"),
            config=[],
            agent_path=None,
            encryption_algs=ssh.ENCRYPTION_ALGS,  # as the plugin's connections
        )
        async with conn:
            result = await sync(ExecShell(conn), self.tree, os.fspath(dest))
        if fresh:
            return time.perf_counter() - started
        assert result.files_sent == 0, result
        return result.seconds


async def _measure(runs: Runs) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {}

    def keep(name: str, seconds: float) -> None:
        times.setdefault(name, []).append(seconds)

    for rep in range(REPEATS):
        order = ["ours", "rsync"] if rep % 2 == 0 else ["rsync", "ours"]
        for who in order:
            if who == "ours":
                keep("ours cold", await runs.ours("ours"))
                keep("ours second session", await runs.ours("ours", fresh=False))
            else:
                keep("rsync -a", _flushed(lambda: runs.rsync("rsync", "-a")))
                keep("rsync -a no change", _flushed(lambda: runs.rsync("rsync", "-a", fresh=False)))
                keep("rsync -az", _flushed(lambda: runs.rsync("rsyncz", "-az")))
    return times


def measure_link(link: str) -> dict[str, Any]:
    """Both trees on this network namespace's loopback: medians and bests per run kind."""
    scratch = Path(tempfile.mkdtemp(prefix="gpucloud-bench-openssh-", dir="/var/tmp"))
    out: dict[str, Any] = {}
    home = scratch / "home"  # no .bashrc: see SHELL_NOTE
    home.mkdir()
    try:
        with LocalSshd({"HOME": str(home)}) as sshd:
            for shape in ("mixed", "text"):
                tree = scratch / f"tree-{shape}"
                tree.mkdir()
                files, size = make_tree(tree, shape)
                dest = scratch / f"dest-{shape}"
                dest.mkdir()
                times = asyncio.run(_measure(Runs(sshd, tree, dest)))
                out[shape] = {
                    "files": files,
                    "bytes": size,
                    "best": {k: min(v) for k, v in times.items()},
                    "median": {k: statistics.median(v) for k, v in times.items()},
                }
            out["versions"] = versions()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def _limited() -> dict[str, Any]:
    """:func:`measure_link` in a network namespace whose loopback runs at 200 Mbit/s."""
    ns = f"gpucloud-bench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        inside = ["ip", "netns", "exec", ns]
        subprocess.run([*inside, "ip", "link", "set", "lo", "up"], check=True)
        shape = ["tbf", "rate", LIMITED, "burst", "256kb", "latency", "50ms"]
        subprocess.run([*inside, "tc", "qdisc", "add", "dev", "lo", "root", *shape], check=True)
        with tempfile.NamedTemporaryFile(suffix=".json") as answer:
            subprocess.run(
                [*inside, sys.executable, __file__, "--link", LIMITED, "--json", answer.name],
                check=True,
            )
            result: dict[str, Any] = json.loads(Path(answer.name).read_text())
            return result
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


SHELL_NOTE = """The sshd's sessions get a home of their own without a `.bashrc`: the login
shell's start-up is the user's, paid once per remote command by rsync and by ours alike (a
`.bashrc` running `pyenv init` added 0.1 s to each here); xdist_ssh.py measures a slow one
on its own."""


def main() -> list[dict[str, Any]]:
    NOTES.append(SHELL_NOTE)
    try:
        ensure_tools()
    except ToolsMissing as exc:
        NOTES.append(f"Skipped: {exc}.")
        return []
    links = {"loopback": measure_link("loopback")}
    if os.geteuid() == 0 and shutil.which("tc") and shutil.which("ip"):
        links[LIMITED] = _limited()
    else:
        NOTES.append(f"The {LIMITED} link needs root, ip and tc: not measured.")
    rows = []
    for link, found in links.items():
        for shape in ("mixed", "text"):
            tree = found[shape]
            best = tree["best"]
            where = f"{shape} tree ({tree['files']:,} files, {tree['bytes'] / 1e6:.0f} MB), {link}"
            for baseline in ("rsync -a", "rsync -az"):
                target = COLD_TARGET[link]
                ok = best["ours cold"] <= target * best[baseline]
                if baseline == "rsync -az" and link == "loopback":
                    target, ok = 0.0, None
                rows.append(
                    best_row(f"cold sync vs {baseline}, {where}", best, "ours cold", baseline, "s",
                             f"<= {target:.1f}x" if ok is not None else "-", ok)
                )  # fmt: skip
            rows.append(
                best_row(f"second session's sync (warm workspace) vs rsync -a no change, {where}",
                         best, "ours second session", "rsync -a no change", "s",
                         f"<= {SECOND_SESSION_TARGET_S * 1000:.0f} ms",
                         best["ours second session"] <= SECOND_SESSION_TARGET_S)
            )  # fmt: skip
        NOTES.append(
            f"{link}: {found['versions']}; medians: {json.dumps(found['mixed']['median'])}"
        )
    return rows


if __name__ == "__main__":
    if "--link" in sys.argv:
        link = sys.argv[sys.argv.index("--link") + 1]
        Path(sys.argv[sys.argv.index("--json") + 1]).write_text(json.dumps(measure_link(link)))
    else:
        for row in main():
            print(f"{row['name']}: {row['value']} s vs {row['baseline']} s = {row['ratio']}x")
