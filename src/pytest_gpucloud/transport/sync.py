"""Mirror a project's files into a directory on an instance, in one SSH exec.

The exec is ``python3 -I -S -c <source of remote/receive.py> DIR``; its docstring has the wire
format. The receiver first prints the manifest it stored last time, less the files changed
on the instance since, so the diff needs no local state: a fresh instance gets everything,
a warm one only what changed. This side then streams one pax tar: removals, chmods and
changed manifest entries, then the changed files and links, then the sha1 of each file.

Speed: the file listing overlaps the remote start. rsync's quick check (same size and
mtime_ns as a known entry, from ``previous`` or from the receiver) spares hashing unchanged
files, and a file that must travel anyway is hashed while it is sent. A worker thread
reads, compresses and hashes the next chunk while the event loop sends the current one.
Small files travel in packs (one tar member, many files), so no side pays a tar header
per file, and before the big ones, so the receiver writes them while those stream in.

Compression is decided per file; the tar itself is not compressed, since the bulk of a
tree's bytes is often incompressible (weights, arrays, archives) while its many source
files compress 3-4x. Files worth it travel in zlib (level 1) packs; the others in plain
packs or, above 1 MiB, as plain members streamed from disk. A file is not compressed when
its extension says it is compressed or random-looking already (``_STORED``: .npz .pt
.safetensors .gz .zip .png ...), or when it is binary (a NUL in its first 8000 bytes,
git's test) and zlib saves under 10% on its first 64 KiB. Files over 64 MiB are streamed
as they are, never held in memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import posixpath
import shlex
import stat
import subprocess
import tarfile
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, NamedTuple

from pytest_gpucloud.core.errors import InstanceError
from pytest_gpucloud.core.sshlib import asyncssh
from pytest_gpucloud.remote import source
from pytest_gpucloud.remote.receive import DIGESTS_HEADER, PACK_HEADER, ZLIB_HEADER
from pytest_gpucloud.transport.commands import Ended, Shell
from pytest_gpucloud.transport.exclusions import Exclusions

if TYPE_CHECKING:
    from asyncssh import SSHWriter

_SKIP_DIRS = frozenset(
    {
        ".git",
        ".hg",
        ".svn",
        ".venv",
        "venv",
        "__pycache__",
        ".pytest_cache",
        ".mypy_cache",
        ".ruff_cache",
        ".tox",
        ".nox",
        "node_modules",
        ".gpucloud",
    }
)
_SKIP_SUFFIXES = (".pyc", ".pyo")
_STORED = frozenset(
    ".npz .npy .pt .pth .bin .safetensors .ckpt .onnx .parquet .arrow .feather .gz .tgz"  # noqa: SIM905
    " .bz2 .xz .zst .lz4 .zip .whl .jar .7z .rar .png .jpg .jpeg .gif .webp .mp3 .mp4 .mkv"
    " .mov .avi .ogg .flac .pdf".split()
)
_PROBE = 64 << 10
_PACK_MAX = 1 << 20  # a pack closes past this size; a bigger incompressible file goes alone
_INLINE_MAX = 64 << 20
_CHUNK = 1 << 20


class Entry(NamedTuple):
    """One mirrored path. ``digest``: sha1 of the content (of the target, for a link)."""

    kind: Literal["file", "link"]
    mode: int
    size: int
    mtime_ns: int
    digest: str

    def to_json(self) -> list[Any]:
        return list(self)

    @classmethod
    def from_json(cls, value: list[Any]) -> Entry:
        kind, mode, size, mtime_ns, digest = value
        if kind not in ("file", "link"):
            raise ValueError(f"unknown entry kind {kind!r}")
        return cls(kind, mode, size, mtime_ns, digest)


Manifest = dict[str, Entry]
# mirrored path -> (local path, lstat)
_Files = Mapping[str, "tuple[str, os.stat_result]"]


@dataclass(frozen=True)
class SyncResult:
    """What one :func:`sync` did; pass ``manifest`` as ``previous`` to the next one.

    ``files_sent`` counts the paths brought up to date (content, link target or mode);
    ``bytes_sent`` the tar bytes written, after compression.
    """

    remote_root: str
    files_sent: int
    bytes_sent: int
    files_removed: int
    seconds: float
    manifest: Manifest


def list_files(root: Path) -> list[str]:
    """The files to mirror under ``root``: posix paths relative to it, sorted.

    Inside a git work tree, the files git tracks or would track (``.gitignore`` respected);
    elsewhere, a walk that skips VCS folders, virtualenvs, caches and ``*.pyc``. Symlinks
    are listed, never followed, and left out when they point out of the tree (the receiver
    would refuse them); a ``.gpucloud`` folder (local artifacts) never is listed, nor are
    secret-shaped files and what ``.gpucloudignore`` names (:mod:`.exclusions`).
    """
    return sorted(_listed(root))


def left_behind(root: Path) -> list[str]:
    """The files under ``root`` that :func:`list_files` leaves out as :mod:`.exclusions`
    says (secret-shaped, or named in ``.gpucloudignore``), sorted."""
    exclusions = Exclusions.of(root)
    return sorted(name for name in _candidates(root) if exclusions.excludes(name))


def _listed(root: Path) -> _Files:
    """:func:`list_files`' selection, each with its path and lstat."""
    exclusions = Exclusions.of(root)
    return {n: f for n, f in _candidates(root).items() if not exclusions.excludes(n)}


def _candidates(root: Path) -> _Files:
    """Git's or the walk's selection, each with its path and lstat (one lstat per file, on
    plain strings: a Path per file would cost more than the lstat)."""
    try:
        done = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            capture_output=True,
            check=False,
        )
    except FileNotFoundError:
        return _walk(root)
    if done.returncode != 0:
        return _walk(root)
    base = os.fspath(root)
    found: dict[str, tuple[str, os.stat_result]] = {}
    for raw in done.stdout.split(b"\0"):
        name = os.fsdecode(raw)
        if name and ".gpucloud" not in name.split("/"):
            _add_listable(found, base, name)
    return found


def _add_listable(found: dict[str, tuple[str, os.stat_result]], base: str, name: str) -> None:
    """Add a file or an in-tree link; skip anything else (deleted-but-tracked files,
    folders such as submodules and nested repositories)."""
    path = os.path.join(base, name)
    try:
        st = os.lstat(path)
    except OSError:
        return
    if stat.S_ISREG(st.st_mode) or (stat.S_ISLNK(st.st_mode) and _link_stays_inside(path, name)):
        found[name] = (path, st)


def _link_stays_inside(path: str, name: str) -> bool:
    target = os.readlink(path)
    if os.path.isabs(target):
        return False
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
    return resolved != ".." and not resolved.startswith("../")


def _walk(root: Path) -> _Files:
    base = os.fspath(root)
    found: dict[str, tuple[str, os.stat_result]] = {}
    pending = [""]
    while pending:
        prefix = pending.pop()
        with os.scandir(root / prefix if prefix else root) as entries:
            for item in entries:
                name = prefix + item.name
                if item.is_dir(follow_symlinks=False):
                    if item.name not in _SKIP_DIRS:
                        pending.append(name + "/")
                elif not item.name.endswith(_SKIP_SUFFIXES):
                    _add_listable(found, base, name)
    return found


def build_manifest(root: Path, files: Iterable[str], previous: Manifest | None = None) -> Manifest:
    """Entries for ``files`` under ``root``; digests of ``previous`` are reused where size and
    mtime_ns are unchanged. Files that vanished or are no longer files or links are left out.
    """
    return _digest_all(
        _stat_all({name: os.path.join(root, name) for name in files}), previous or {}
    )


def diff(old: Manifest, new: Manifest) -> tuple[list[str], list[str]]:
    """``(changed, removed)``, sorted: changed covers added paths and any change of content,
    mode, kind or link target."""
    changed = [
        name
        for name, entry in new.items()
        if (known := old.get(name)) is None
        or (known.kind, known.mode, known.digest) != (entry.kind, entry.mode, entry.digest)
    ]
    return sorted(changed), sorted(name for name in old if name not in new)


async def sync(
    shell: Shell,
    root: Path,
    remote_dir: str,
    *,
    extra: Mapping[str, Path] | None = None,
    previous: Manifest | None = None,
    root_known: asyncio.Future[str] | None = None,
) -> SyncResult:
    """Make ``remote_dir`` (absolute, or relative to the remote login directory) mirror the
    files :func:`list_files` selects under ``root``, plus ``extra`` (path in the mirror ->
    local file), in one remote command. Raises :class:`InstanceError` when the sync fails.

    ``root_known`` gets the absolute ``remote_dir`` as soon as it exists on the instance,
    long before the files are there: what needs only the folder can start then."""
    started = time.perf_counter()
    command = f"python3 -I -S -c {shlex.quote(source('receive'))} {shlex.quote(remote_dir)}"
    failed = f"code sync to {remote_dir} failed"
    # The listing goes on while the receiver starts (and a static host's hub, first).
    scanning = asyncio.ensure_future(asyncio.to_thread(_scan, root, dict(extra or {})))
    try:
        proc = await shell.create_process(command)
    except (OSError, asyncssh.Error) as exc:
        await asyncio.wait({scanning})
        raise InstanceError(f"{failed}: {exc}") from None
    try:
        files = await scanning
        head = await proc.stdout.readline()
        if not head:
            raise InstanceError(f"{failed}: {_reason(await proc.wait())}")
        answer = json.loads(head)
        if root_known is not None and not root_known.done():
            root_known.set_result(answer["root"])
        remote = {name: Entry.from_json(value) for name, value in answer["manifest"].items()}
        known = {**remote, **(previous or {})}
        manifest = await asyncio.to_thread(_digest_all, files, known, remote)
        changed, removed = diff(remote, manifest)
        chmod = {n for n in changed if _mode_only(remote.get(n), manifest[n])}
        control = {
            "removed": removed,
            "chmod": sorted(chmod),
            "entries": {n: e.to_json() for n, e in manifest.items() if remote.get(n) != e},
        }
        digests: dict[str, str] = {}
        send = [n for n in changed if n not in chmod]
        sent = await _send(proc.stdin, _tar_chunks(control, files, manifest, send, digests))
        done = await proc.wait()
        if sent is None or done.exit_status != 0 or not _said_ok(done.stdout):
            raise InstanceError(f"{failed}: {_reason(done)}")
    except (OSError, asyncssh.Error, ValueError, KeyError) as exc:
        raise InstanceError(f"{failed}: {exc}") from None
    finally:
        proc.close()
    return SyncResult(
        remote_root=answer["root"],
        files_sent=len(changed),
        bytes_sent=sent,
        files_removed=len(removed),
        seconds=time.perf_counter() - started,
        manifest={**manifest, **{n: manifest[n]._replace(digest=d) for n, d in digests.items()}},
    )


def _mode_only(old: Entry | None, new: Entry) -> bool:
    return old is not None and old.kind == new.kind == "file" and old.digest == new.digest


def _said_ok(out: bytes | str | None) -> bool:
    return isinstance(out, bytes) and out.startswith(b"ok ")


def _reason(done: Ended) -> str:
    err = done.stderr
    lines = (err.decode(errors="replace") if isinstance(err, bytes) else "").strip().splitlines()
    if lines:
        return lines[-1]
    return f"the receiver exited with status {done.exit_status}"


async def _send(stdin: SSHWriter[bytes], chunks: Iterator[bytes]) -> int | None:
    """Write ``chunks`` (made in a worker thread, one ahead) and EOF; return the bytes
    written, or None when the receiver stopped reading."""
    sent = 0
    pending = asyncio.ensure_future(asyncio.to_thread(next, chunks, None))
    while (chunk := await pending) is not None:
        pending = asyncio.ensure_future(asyncio.to_thread(next, chunks, None))
        try:
            stdin.write(chunk)
            await stdin.drain()
        except (OSError, asyncssh.Error):
            await asyncio.wait({pending})
            return None
        sent += len(chunk)
    stdin.write_eof()
    return sent


def _scan(root: Path, extra: dict[str, Path]) -> _Files:
    return {**_listed(root), **_stat_all({name: os.fspath(path) for name, path in extra.items()})}


def _stat_all(sources: Mapping[str, str]) -> _Files:
    files = {}
    for name, path in sources.items():
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
            files[name] = (path, st)
    return files


def _digest_all(files: _Files, known: Manifest, remote: Manifest | None = None) -> Manifest:
    """Entries for ``files``. A file keeps the digest of its ``known`` entry where size and
    mtime_ns match, else is hashed; but where ``remote`` shows that it must travel anyway
    (absent there, or of another size), its digest is left empty, made while it is sent."""
    manifest: Manifest = {}
    for name, (path, st) in files.items():
        old = known.get(name)
        try:
            if stat.S_ISLNK(st.st_mode):
                kind: Literal["file", "link"] = "link"
                digest = _sha1(os.fsencode(os.readlink(path)))
            elif (
                old is not None
                and old.kind == "file"
                and (old.size, old.mtime_ns) == (st.st_size, st.st_mtime_ns)
            ):
                kind, digest = "file", old.digest
            elif remote is not None and _must_send(remote.get(name), st):
                kind, digest = "file", ""
            else:
                kind, digest = "file", _file_digest(path)
        except OSError:
            continue  # vanished or replaced since the listing
        manifest[name] = Entry(kind, stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns, digest)
    return manifest


def _must_send(there: Entry | None, st: os.stat_result) -> bool:
    return there is None or there.kind != "file" or there.size != st.st_size


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data, usedforsecurity=False).hexdigest()


def _file_digest(path: str) -> str:
    h = hashlib.sha1(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _tar_chunks(
    control: dict[str, Any],
    files: _Files,
    manifest: Manifest,
    send: list[str],
    digests: dict[str, str],
) -> Iterator[bytes]:
    """The sync tar, in chunks of about ``_CHUNK`` bytes: ``control``, the paths in ``send``,
    then the sha1 of each file sent, also recorded in ``digests``."""
    out = bytearray(_member(tarfile.TarInfo("gpucloud-sync.json"), json.dumps(control).encode()))
    packs: dict[bool, list[tuple[str, bytes]]] = {True: [], False: []}
    packed = {True: 0, False: 0}
    # Small files first: the receiver writes them while the big ones stream in.
    for name in sorted(send, key=lambda n: manifest[n].size > _PACK_MAX):
        path, entry = files[name][0], manifest[name]
        info = tarfile.TarInfo(name)
        info.mode = entry.mode & 0o7777
        info.mtime = entry.mtime_ns // 1_000_000_000
        if entry.kind == "link":
            info.type = tarfile.SYMTYPE
            info.linkname = os.readlink(path)
            out += _header(info, 0)
            continue
        with open(path, "rb") as f:
            head = f.read(_PROBE)
            suffix = os.path.splitext(path)[1].lower()
            compress = suffix not in _STORED and _compressible(head)
            if entry.size > _PACK_MAX and (not compress or entry.size > _INLINE_MAX):
                out += _header(info, entry.size) + head
                yield bytes(out)
                out.clear()
                sha1 = hashlib.sha1(head, usedforsecurity=False)
                for chunk in _read_exact(f, entry.size - len(head)):
                    sha1.update(chunk)
                    yield chunk
                digests[name] = sha1.hexdigest()
                out += _padding(entry.size)
                continue
            data = head + f.read()
        digests[name] = _sha1(data)
        packs[compress].append((name, data))
        packed[compress] += len(data)
        if packed[compress] >= _PACK_MAX:
            out += _pack(packs[compress], compress)
            packs[compress], packed[compress] = [], 0
        if len(out) >= _CHUNK:
            yield bytes(out)
            out.clear()
    for compress, pack in packs.items():
        if pack:
            out += _pack(pack, compress)
    trailer = tarfile.TarInfo("gpucloud-digests")
    trailer.pax_headers = {DIGESTS_HEADER: json.dumps(digests)}
    out += _header(trailer, 0) + bytes(2 * tarfile.BLOCKSIZE)
    yield bytes(out)


def _compressible(head: bytes) -> bool:
    """Text (no NUL in its first 8000 bytes, git's test) or a zlib probe that saves 10%."""
    return b"\0" not in head[:8000] or len(zlib.compress(head, 1)) <= 0.9 * len(head)


def _pack(files: list[tuple[str, bytes]], compress: bool) -> bytes:
    info = tarfile.TarInfo("gpucloud-pack")
    info.pax_headers = {PACK_HEADER: json.dumps([[name, len(data)] for name, data in files])}
    payload = b"".join(data for _, data in files)
    if compress:
        info.pax_headers[ZLIB_HEADER] = "1"
        payload = zlib.compress(payload, 1)
    return _member(info, payload)


def _member(info: tarfile.TarInfo, payload: bytes) -> bytes:
    return _header(info, len(payload)) + payload + _padding(len(payload))


def _header(info: tarfile.TarInfo, size: int) -> bytes:
    info.size = size
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _padding(size: int) -> bytes:
    return bytes(-size % tarfile.BLOCKSIZE)


def _read_exact(f: BinaryIO, size: int) -> Iterator[bytes]:
    while size:
        chunk = f.read(min(_CHUNK, size))
        if not chunk:
            raise OSError(f"{f.name} shrank while being sent")
        size -= len(chunk)
        yield chunk
