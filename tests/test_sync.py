"""The code sync: file selection, manifest diff, and real transfers over SSH on 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

import asyncssh
import pytest

from pytest_gpucloud.core.errors import InstanceError
from pytest_gpucloud.remote import receive
from pytest_gpucloud.transport.commands import ExecShell
from pytest_gpucloud.transport.sync import (
    Entry,
    Manifest,
    SyncResult,
    build_manifest,
    diff,
    list_files,
    sync,
)


class Remote:
    """An SSH server on 127.0.0.1 whose exec runs ``/bin/sh -c`` in a temporary home."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self._host_key = asyncssh.generate_private_key("ssh-ed25519")
        self._client_key = asyncssh.generate_private_key("ssh-ed25519")
        self.env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(home)}

    async def _handle(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        pipe = asyncio.subprocess.PIPE
        shell = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            process.command or "",
            stdin=pipe,
            stdout=pipe,
            stderr=pipe,
            cwd=self.home,
            env=self.env,
        )
        assert shell.stdin
        assert shell.stdout
        assert shell.stderr
        # No EOF per stream: an EOF on the channel would cut off the other stream.
        await process.redirect(
            stdin=shell.stdin,
            stdout=shell.stdout,
            stderr=shell.stderr,
            bufsize=1 << 16,
            send_eof=False,
        )
        await process.stdout.drain()  # returns once stdout and stderr reached EOF
        await process.stderr.drain()
        process.exit(await shell.wait())
        await process.wait_closed()

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[asyncssh.SSHClientConnection]:
        public = self._client_key.export_public_key().decode()
        server = await asyncssh.create_server(
            asyncssh.SSHServer,
            "127.0.0.1",
            0,
            server_host_keys=[self._host_key],
            authorized_client_keys=asyncssh.import_authorized_keys(public),
            process_factory=self._handle,
            encoding=None,
        )
        try:
            port = server.sockets[0].getsockname()[1]
            async with asyncssh.connect(
                "127.0.0.1",
                port,
                username="tester",
                client_keys=[self._client_key],
                known_hosts=([self._host_key.convert_to_public()], [], []),
                agent_path=None,
                config=[],
            ) as conn:
                yield conn
        finally:
            server.close()
            await server.wait_closed()

    def sync(
        self,
        root: Path,
        remote_dir: str = "work/proj",
        *,
        extra: Mapping[str, Path] | None = None,
        previous: Manifest | None = None,
    ) -> SyncResult:
        """One :func:`sync` over a fresh connection, in its own event loop."""

        async def main() -> SyncResult:
            async with self.connect() as conn:
                return await sync(ExecShell(conn), root, remote_dir, extra=extra, previous=previous)

        return asyncio.run(main())


@pytest.fixture
def remote(tmp_path: Path) -> Remote:
    home = tmp_path / "home"
    home.mkdir()
    return Remote(home)


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def write(path: Path, text: str | bytes, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, str):
        path.write_text(text)
    else:
        path.write_bytes(text)
    path.chmod(mode)
    return path


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git work tree: tracked, untracked, ignored and deleted files, a link, artifacts."""
    root = tmp_path / "repo"
    git(tmp_path, "init", "-q", str(root))
    write(root / ".gitignore", "*.log\nbuild/\n")
    write(root / "src/pkg/__init__.py", "")
    write(root / "src/pkg/mod.py", "def f():\n    return 1\n" * 50)
    write(root / "scripts/run.sh", "#!/bin/sh\necho hi\n", 0o755)
    write(root / "data/blob.bin", os.urandom(200_000))
    write(root / "gone.py", "x = 1\n")
    git(root, "add", ".")
    (root / "gone.py").unlink()  # tracked, deleted from the work tree
    write(root / "untracked.py", "y = 2\n")
    write(root / "debug.log", "ignored\n")
    write(root / "build/out.txt", "ignored\n")
    write(root / ".gpucloud/report.txt", "local artifact\n")
    (root / "link.py").symlink_to("src/pkg/mod.py")
    return root


def test_list_files_in_git(repo: Path) -> None:
    assert list_files(repo) == [
        ".gitignore",
        "data/blob.bin",
        "link.py",
        "scripts/run.sh",
        "src/pkg/__init__.py",
        "src/pkg/mod.py",
        "untracked.py",
    ]


def test_list_files_in_a_subfolder_of_a_repo(repo: Path) -> None:
    write(repo / "src/notes.log", "ignored\n")
    assert list_files(repo / "src") == ["pkg/__init__.py", "pkg/mod.py"]


def test_list_files_outside_git_walks_with_excludes(tmp_path: Path) -> None:
    root = tmp_path / "plain"
    write(root / "a.py", "a")
    write(root / "pkg/b.py", "b")
    write(root / "pkg/b.pyc", "compiled")
    for skipped in (".git", ".venv", "venv", "__pycache__", ".pytest_cache", "node_modules"):
        write(root / skipped / "x.py", "skipped")
    write(root / "pkg/__pycache__/b.cpython-311.pyc", "compiled")
    write(root / ".gpucloud/artifact.txt", "artifact")
    (root / "dirlink").symlink_to("pkg")
    (root / "dangling").symlink_to("nowhere")
    assert list_files(root) == ["a.py", "dangling", "dirlink", "pkg/b.py"]


def test_links_out_of_the_tree_are_left_behind(tmp_path: Path) -> None:
    (tmp_path / "inside.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "up.txt").symlink_to("../inside.txt")
    (tmp_path / "absolute").symlink_to(tmp_path / "inside.txt")
    (tmp_path / "escape").symlink_to("../elsewhere")
    assert list_files(tmp_path) == ["inside.txt", "sub/up.txt"]


def test_manifest_reuses_digests_only_when_size_and_mtime_match(tmp_path: Path) -> None:
    path = write(tmp_path / "f.txt", "aaaa")
    first = build_manifest(tmp_path, ["f.txt", "missing.txt"])
    assert list(first) == ["f.txt"]
    st = path.stat()
    path.write_text("bbbb")  # same size; put the mtime back: the quick check cannot tell
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert build_manifest(tmp_path, ["f.txt"], first) == first
    assert build_manifest(tmp_path, ["f.txt"])["f.txt"].digest != first["f.txt"].digest
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert build_manifest(tmp_path, ["f.txt"], first)["f.txt"].digest != first["f.txt"].digest


def test_diff() -> None:
    def entry(
        kind: Literal["file", "link"] = "file", mode: int = 0o644, digest: str = "d", mtime: int = 1
    ) -> Entry:
        return Entry(kind, mode, 1, mtime, digest)

    old: Manifest = {
        "same": entry(),
        "touched": entry(),
        "content": entry(),
        "chmod": entry(),
        "kind": entry(),
        "target": entry("link", 0o777, "t1"),
        "removed": entry(),
    }
    new: Manifest = {
        "same": entry(),
        "touched": entry(mtime=2),
        "content": entry(digest="e"),
        "chmod": entry(mode=0o755),
        "kind": entry("link", 0o777),
        "target": entry("link", 0o777, "t2"),
        "added": entry(),
    }
    assert diff(old, new) == (["added", "chmod", "content", "kind", "target"], ["removed"])
    assert diff({}, new) == (sorted(new), [])
    assert diff(new, new) == ([], [])


def assert_mirrors(local: Path, mirror: Path, extra: frozenset[str] = frozenset()) -> None:
    expected = set(list_files(local))
    found = {str(p.relative_to(mirror)) for p in mirror.rglob("*") if p.is_symlink() or p.is_file()}
    assert found == expected | extra
    for name in expected:
        here, there = local / name, mirror / name
        if here.is_symlink():
            assert os.readlink(there) == os.readlink(here), name
            continue
        assert not there.is_symlink(), name
        assert there.read_bytes() == here.read_bytes(), name
        assert stat.S_IMODE(there.stat().st_mode) == stat.S_IMODE(here.stat().st_mode), name
        assert there.stat().st_mtime_ns == here.stat().st_mtime_ns, name


def test_cold_then_warm_sync_mirrors_every_kind_of_change(repo: Path, remote: Remote) -> None:
    cold = remote.sync(repo)
    mirror = remote.home / "work/proj"
    assert cold.remote_root == str(mirror)
    assert cold.files_sent == len(list_files(repo)) == 7
    assert_mirrors(repo, mirror)
    assert not (mirror / "debug.log").exists()
    assert not (mirror / "build").exists()
    assert not (mirror / ".gpucloud").exists()

    write(repo / "src/pkg/mod.py", "def f():\n    return 2\n")  # changed
    write(repo / "src/pkg/new.py", "added = True\n")  # added
    (repo / "untracked.py").unlink()  # removed
    (repo / "scripts/run.sh").rename(repo / "scripts/start.sh")  # renamed
    (repo / "data/blob.bin").chmod(0o755)  # chmod +x
    (repo / "link.py").unlink()
    (repo / "link.py").symlink_to("src/pkg/new.py")  # link target changed
    (repo / "latest").symlink_to("scripts")  # link to a folder
    write(repo / "more.log", "ignored\n")
    warm = remote.sync(repo, previous=cold.manifest)
    assert warm.files_sent == 6  # mod.py, new.py, start.sh, blob.bin, link.py, latest
    assert warm.files_removed == 2  # untracked.py, run.sh
    assert warm.bytes_sent < 20_000  # the 200 kB blob changed mode only: no content resent
    assert_mirrors(repo, mirror)
    assert not (mirror / "more.log").exists()

    (repo / "src/pkg/new.py").unlink()
    (repo / "src/pkg/__init__.py").unlink()
    (repo / "src/pkg/mod.py").unlink()
    (repo / "link.py").unlink()
    again = remote.sync(repo, previous=warm.manifest)
    assert again.files_removed == 4
    assert not (mirror / "src").exists()  # folders left empty go too
    assert_mirrors(repo, mirror)


def test_no_change_sync_sends_nothing_even_without_local_state(repo: Path, remote: Remote) -> None:
    first = remote.sync(repo)
    assert remote.sync(repo, previous=first.manifest).files_sent == 0
    second = remote.sync(repo)  # the receiver's manifest is enough
    assert (second.files_sent, second.files_removed) == (0, 0)
    assert second.manifest == first.manifest


def test_files_changed_on_the_instance_travel_again(
    repo: Path, remote: Remote, tmp_path: Path
) -> None:
    first = remote.sync(repo)
    mirror = remote.home / "work/proj"
    (mirror / "src/pkg/mod.py").write_text("broken\n")
    outside = write(tmp_path / "outside.txt", "not yours\n")
    (mirror / "untracked.py").unlink()
    (mirror / "untracked.py").symlink_to(outside)  # must be replaced, never written through
    again = remote.sync(repo, previous=first.manifest)
    assert again.files_sent == 2
    assert_mirrors(repo, mirror)
    assert outside.read_text() == "not yours\n"


def test_kind_changes_and_odd_names(repo: Path, remote: Remote) -> None:
    first = remote.sync(repo)
    (repo / "untracked.py").unlink()
    (repo / "untracked.py").symlink_to("scripts/run.sh")  # file -> link
    (repo / "link.py").unlink()
    write(repo / "link.py", "now a file\n")  # link -> file
    (repo / "data/blob.bin").unlink()
    write(repo / "data/blob.bin/inner.py", "x = 1\n")  # file -> folder
    write(repo / "docs/ünïcode name.md", "# ü\n")
    write(repo / ("deep/" * 30 + "long.py"), "deep = True\n")  # > 100 bytes: pax path
    write(repo / "empty.txt", "")
    again = remote.sync(repo, previous=first.manifest)
    assert (again.files_sent, again.files_removed) == (6, 1)
    assert_mirrors(repo, remote.home / "work/proj")
    assert remote.sync(repo).files_sent == 0


def test_extra_files_arrive_and_go(repo: Path, remote: Remote, tmp_path: Path) -> None:
    worker = write(tmp_path / "elsewhere/worker.py", "print('worker')\n")
    target = str(tmp_path / "absolute/proj")
    first = remote.sync(repo, target, extra={"pkg/gpucloud_remote/worker.py": worker})
    assert first.remote_root == target
    mirror = Path(target)
    assert (mirror / "pkg/gpucloud_remote/worker.py").read_bytes() == worker.read_bytes()
    assert_mirrors(repo, mirror, frozenset({"pkg/gpucloud_remote/worker.py"}))
    assert (
        remote.sync(repo, target, extra={"pkg/gpucloud_remote/worker.py": worker}).files_sent == 0
    )
    assert remote.sync(repo, target).files_removed == 1
    assert not (mirror / "pkg").exists()


def test_compression_only_where_it_pays(tmp_path: Path, remote: Remote) -> None:
    root = tmp_path / "plain"
    write(root / "text.csv", "0.5,1.5,text\n" * 100_000)  # 1.3 MB, compresses well
    write(root / "small.py", "print('hello')\n" * 100)
    write(root / "noise.dat", os.urandom(1_500_000))  # binary: probed, streamed as is
    write(root / "weights.npy", os.urandom(1_500_000))  # known suffix: streamed as is
    write(root / "tiny.png", os.urandom(10_000))  # known suffix: in a plain pack
    result = remote.sync(root)
    assert 3_010_000 < result.bytes_sent < 3_010_000 + 100_000
    assert_mirrors(root, remote.home / "work/proj")


def test_missing_python_on_the_instance_is_an_instance_error(repo: Path, remote: Remote) -> None:
    remote.env["PATH"] = "/nonexistent"
    with pytest.raises(InstanceError, match=r"code sync to work/proj failed: .*python3.*not found"):
        remote.sync(repo)


def hostile_tar(*members: tuple[tarfile.TarInfo, bytes], removed: tuple[str, ...] = ()) -> bytes:
    names = [info.name for info, _ in members]
    entries = {n: ["file", 0o644, 1, 0, "x"] for n in names}
    control = json.dumps({"removed": removed, "chmod": [], "entries": entries}).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        head = tarfile.TarInfo("gpucloud-sync.json")
        head.size = len(control)
        tar.addfile(head, io.BytesIO(control))
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


HOSTILE = {
    "absolute": [(member("/tmp/evil"), b"x")],
    "dotdot": [(member("../evil"), b"x")],
    "inner dotdot": [(member("a/../../evil"), b"x")],
    "absolute link": [(member("l", tarfile.SYMTYPE, "/etc"), b"")],
    "escaping link": [(member("l", tarfile.SYMTYPE, "../outside"), b"")],
    "link chain": [
        (member("b", tarfile.SYMTYPE, "a/.."), b""),
        (member("a", tarfile.SYMTYPE, "."), b""),
    ],
    "through a link": [(member("out/evil"), b"x")],
    "device": [(member("dev", tarfile.CHRTYPE), b"")],
    "fifo": [(member("fifo", tarfile.FIFOTYPE), b"")],
    "hard link": [(member("hard", tarfile.LNKTYPE, "x"), b"")],
    "directory": [(member("dir", tarfile.DIRTYPE), b"")],
}


def receive_stream(stream: bytes, mirror: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, receive.__file__, str(mirror)],
        input=stream,
        capture_output=True,
        check=False,
    )


@pytest.mark.parametrize("case", list(HOSTILE))
def test_receiver_refuses_hostile_members(case: str, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "out").symlink_to(outside)  # as if a test had made it on the instance
    done = receive_stream(hostile_tar(*HOSTILE[case]), mirror)
    assert done.returncode == 1
    assert b"refused" in done.stderr
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in mirror.iterdir() if p.name not in ("out", "a")) == []
    assert not Path(str(mirror) + ".manifest.json").exists()


@pytest.mark.parametrize("name", ["../outside/keep.txt", "out/keep.txt", "/etc/hostname"])
def test_receiver_refuses_hostile_removals(name: str, tmp_path: Path) -> None:
    keep = write(tmp_path / "outside/keep.txt", "keep\n")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "out").symlink_to(keep.parent)
    done = receive_stream(hostile_tar(removed=(name,)), mirror)
    assert (done.returncode, keep.exists()) == (1, True)
    assert b"refused" in done.stderr


def test_receiver_rejects_a_stream_cut_short(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    done = receive_stream(hostile_tar((member("a.py"), b"x")), mirror)  # no digests at the end
    assert done.returncode == 1
    assert b"ended early" in done.stderr
    assert not Path(str(mirror) + ".manifest.json").exists()


def test_receiver_rejects_a_garbled_header(tmp_path: Path) -> None:
    stream = bytearray(hostile_tar((member("a.py"), b"x")))
    stream[1024 + 100] ^= 0x01  # the mode field of the second member's pax header
    done = receive_stream(bytes(stream), tmp_path / "mirror")
    assert done.returncode == 1
    assert b"checksum" in done.stderr
    assert not Path(str(tmp_path / "mirror") + ".manifest.json").exists()


def test_receiver_rejects_a_stream_that_ends_inside_a_member(tmp_path: Path) -> None:
    stream = hostile_tar((member("big.bin"), bytes(5000)))
    done = receive_stream(stream[:3000], tmp_path / "mirror")
    assert done.returncode == 1
    assert b"cut short" in done.stderr


def test_the_receiver_reads_ahead_of_its_writes_within_a_bound() -> None:
    """While files are written, the pipe is read on, up to the limit and no further; what
    is read comes out whole, in order, then the end."""
    data = os.urandom(9 << 20)
    read_end, write_end = os.pipe()
    limit = 3 << 20
    ahead = receive.ReadAhead(read_end, limit=limit)
    written = [0]

    def write() -> None:
        with os.fdopen(write_end, "wb") as pipe:
            for start in range(0, len(data), 1 << 16):
                pipe.write(data[start : start + (1 << 16)])
                pipe.flush()
                written[0] = start + (1 << 16)

    writer = threading.Thread(target=write)
    writer.start()
    last = -1
    while written[0] != last:  # until the writer is held up: the reader stopped at its limit
        last = written[0]
        time.sleep(0.2)
    assert limit <= written[0] <= limit + (2 << 20), "read ahead as far as the limit, no further"
    buffer = memoryview(bytearray(1000))
    got = [ahead.read(7), bytes(buffer[: ahead.readinto(buffer)])]
    got.append(ahead.read(len(data)))
    writer.join()
    assert b"".join(got) == data
    assert ahead.read(10) == b""
    os.close(read_end)
