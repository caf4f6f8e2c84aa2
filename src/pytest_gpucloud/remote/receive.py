"""Receiving end of a code sync; runs on the instance as ``python3 -I -S -c <source> DIR``.

Standard library only (Python >= 3.7): it is sent as the source of the exec itself, before
anything of ours exists on the instance. ``DIR`` is absolute or relative to the login
directory. The exchange, all on the exec's stdin and stdout:

1. Prints one JSON line ``{"root": <absolute DIR>, "manifest": {path: entry}}``: the
   manifest stored by the last sync (in ``DIR.manifest.json``, next to the tree), less the
   paths whose file changed on disk since (size, mtime or mode), so they travel again. An
   entry is ``[kind, mode, size, mtime_ns, sha1]``.
2. Reads one pax tar. The first member is JSON ``{"removed": [...], "chmod": [...],
   "entries": {...}}``: paths to delete, files whose mode alone changed, and the entries
   that differ from the printed manifest. Then regular files, symlinks and packs: a pack
   holds many files back to back, listed in its pax header ``GPUCLOUD.pack`` as JSON
   ``[[path, size], ...]``, zlib-compressed when it has the pax header ``GPUCLOUD.zlib``.
   Last, an empty member whose pax header ``GPUCLOUD.digests`` gives the sha1 of each file
   sent (hashed while sending); a stream without it is incomplete.
3. Deletes, chmods, writes each file under a temporary name then renames it, with mode
   and mtime from its entry, stores the new manifest atomically, prints ``ok <DIR>``.

Refused, with exit status 1 and the reason on stderr: absolute paths, ``..``, paths
through a symlink that leaves the tree, symlinks pointing outside the tree, and any member
that is not a regular file or a symlink (devices, fifos, hard links, directories).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import sys
import threading
import zlib

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing and shutil stay out of the startup, before the head line
    from collections.abc import Iterable, Iterator
    from typing import Any, Protocol

    Chunk = bytes | memoryview

    class Stream(Protocol):  # (positional-only the old way: Python 3.7 parses this too)
        def read(self, __size: int) -> bytes: ...
        def readinto(self, __buffer: memoryview) -> int: ...


PACK_HEADER = "GPUCLOUD.pack"
DIGESTS_HEADER = "GPUCLOUD.digests"
ZLIB_HEADER = "GPUCLOUD.zlib"
_CHUNK = 1 << 20
_READ_AHEAD = 64 << 20  # of the stream, held in memory while files are written
_BLOCK = 512
_REGULAR = (b"0", b"\0")
_SYMLINK = b"2"
_PAX = b"x"
_HEADER_MAX = 64 << 20
_ZERO_BLOCK = bytes(_BLOCK)
_EXTENSIONS = (_PAX, b"g", b"L", b"K")  # headers that describe the member after them


class Refused(Exception):
    """A tar member or path that would land outside the tree, or is of a refused type."""


class Tree:
    """The mirrored directory, with the path checks that keep every write inside it."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.real = os.path.realpath(root)
        self._safe_dirs: set[str] = set()
        self._made_dirs: set[str] = set()

    def path(self, name: str) -> str:
        """The local path of member ``name``, refused unless it stays inside the tree."""
        parts = name.split("/")
        if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise Refused(f"refused path {name!r}: absolute, empty or with '..'")
        path = os.path.join(self.root, *parts)
        parent = os.path.dirname(path)
        if parent not in self._safe_dirs:
            if not self.inside(os.path.realpath(parent)):
                raise Refused(f"refused path {name!r}: it goes through a link out of the tree")
            self._safe_dirs.add(parent)
        return path

    def inside(self, real: str) -> bool:
        return real == self.real or real.startswith(self.real.rstrip("/") + "/")

    def remove(self, name: str) -> None:
        path = self.path(name)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except IsADirectoryError:
            _rmtree(path)
        parent = os.path.dirname(path)
        while parent != self.root:
            try:
                os.rmdir(parent)
            except OSError:
                break
            self._safe_dirs.discard(parent)
            self._made_dirs.discard(parent)
            parent = os.path.dirname(parent)

    def write(self, path: str, content: Iterable[Chunk], entry: list[Any]) -> list[int]:
        """Write a file; return its stat key. A new file is written in place; one that
        exists is written under a temporary name, then renamed over it."""
        fresh = self._fresh(path)
        if fresh is None:
            target = self._temporary(path)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        else:
            target, fd = path, fresh
        try:
            for chunk in content:
                _write_all(fd, chunk)
            os.fchmod(fd, entry[1] & 0o7777)
            os.utime(fd, ns=(entry[3], entry[3]))
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if target != path:
            _replace(target, path)
        return [st.st_size, st.st_mtime_ns, st.st_mode]

    def _fresh(self, path: str) -> int | None:
        """An fd of ``path`` made now, or None when something is there already."""
        parent = os.path.dirname(path)
        if parent not in self._made_dirs:
            os.makedirs(parent, exist_ok=True)
            self._made_dirs.add(parent)
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return None

    def link(self, path: str, target: str) -> list[int]:
        if target.startswith("/") or not self.inside(_realpath_via(path, target)):
            raise Refused(f"refused link {path!r} -> {target!r}: it points out of the tree")
        tmp = self._temporary(path)
        os.symlink(target, tmp)
        _replace(tmp, path)
        st = os.lstat(path)
        return [st.st_size, st.st_mtime_ns, st.st_mode]

    def _temporary(self, path: str) -> str:
        """A free name next to ``path``, its folder made."""
        parent, base = os.path.split(path)
        if parent not in self._made_dirs:
            os.makedirs(parent, exist_ok=True)
            self._made_dirs.add(parent)
        tmp = os.path.join(parent, f".{base}.gpucloud~")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # left behind by an interrupted sync
        return tmp


def _write_all(fd: int, data: Chunk) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _rmtree(path: str) -> None:
    import shutil

    shutil.rmtree(path)


def _realpath_via(path: str, target: str) -> str:
    return os.path.realpath(os.path.join(os.path.dirname(path), target))


def _replace(tmp: str, path: str) -> None:
    try:
        os.replace(tmp, path)
    except IsADirectoryError:  # something made a directory where the tree has a file
        _rmtree(path)
        os.replace(tmp, path)


def _stat_key(path: str) -> list[int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_mode]


def load(store: str, root: str) -> dict[str, Any]:
    """The stored manifest and stats, less the entries whose file changed on disk since."""
    try:
        with open(store, "rb") as f:
            stored = json.load(f)
        manifest, stats = stored["manifest"], stored["stat"]
    except (OSError, ValueError, KeyError, TypeError):
        return {"manifest": {}, "stat": {}}
    valid = {
        name: stat
        for name, stat in stats.items()
        if name in manifest and _stat_key(os.path.join(root, name)) == stat
    }
    return {"manifest": {name: manifest[name] for name in valid}, "stat": valid}


class Receiver:
    """Applies the members of one sync tar to the tree, in order."""

    def __init__(self, tree: Tree, stored: dict[str, Any], control: dict[str, Any]) -> None:
        self.tree = tree
        self.manifest: dict[str, list[Any]] = dict(stored["manifest"])
        self.stats: dict[str, Any] = dict(stored["stat"])
        self.links: list[tuple[str, str]] = []
        self.digests: dict[str, str] | None = None
        for name in control["removed"]:
            tree.remove(name)
            self.manifest.pop(name, None)
            self.stats.pop(name, None)
        self.manifest.update(control["entries"])
        for name in control["chmod"]:
            path = tree.path(name)
            os.chmod(path, self.manifest[name][1] & 0o7777)
            self.stats[name] = _stat_key(path)

    def member(self, tar: TarStream, member: Member) -> None:
        headers = member.pax
        if DIGESTS_HEADER in headers:
            self.digests = json.loads(headers[DIGESTS_HEADER])
        elif member.kind in _REGULAR and PACK_HEADER in headers:
            payload = tar.read()
            if ZLIB_HEADER in headers:
                payload = zlib.decompress(payload)
            view, offset = memoryview(payload), 0
            for name, size in json.loads(headers[PACK_HEADER]):
                self.put(name, [view[offset : offset + size]])
                offset += size
            if offset != len(payload):
                raise Refused("a pack does not match its index")
        elif member.kind in _REGULAR:
            self.put(member.name, tar.chunks())
        elif member.kind == _SYMLINK:
            self.put(member.name, None, member.linkname)
        else:
            raise Refused(f"refused member {member.name!r}: not a regular file or symlink")

    def put(self, name: str, content: Iterable[Chunk] | None, link: str = "") -> None:
        path = self.tree.path(name)
        if name not in self.manifest:
            raise Refused(f"member {name!r} is not in the manifest")
        if content is None:
            self.stats[name] = self.tree.link(path, link)
            self.links.append((path, link))
        else:
            self.stats[name] = self.tree.write(path, content, self.manifest[name])

    def finish(self) -> dict[str, Any]:
        """Check the links and the stream's end; the manifest and stats to store."""
        # A link can leave the tree through links that arrived after it: check them again.
        for path, target in self.links:
            if not self.tree.inside(_realpath_via(path, target)):
                os.unlink(path)
                raise Refused(f"refused link {path!r} -> {target!r}: it points out of the tree")
        if self.digests is None:
            raise Refused("the sync stream ended early")
        for name, digest in self.digests.items():
            self.manifest[name] = [*self.manifest[name][:4], digest]
        stats = {k: v for k, v in self.stats.items() if k in self.manifest and v is not None}
        return {"manifest": {k: self.manifest[k] for k in stats}, "stat": stats}


class BadTar(ValueError):
    """A tar stream cut short or garbled."""


class Member:
    """One tar member: ``kind`` is its typeflag; ``pax`` its extended header's records.
    ``mode``, ``mtime`` and ``linkname`` are read from the header when asked for."""

    def __init__(
        self, name: str, kind: bytes, size: int, header: bytes, pax: dict[str, str], link: str
    ) -> None:
        self.name, self.kind, self.size, self.pax = name, kind, size, pax
        self._header, self._link = header, link

    @property
    def mode(self) -> int:
        return _number(self._header[100:108])

    @property
    def mtime(self) -> float:
        return float(self.pax.get("mtime", _number(self._header[136:148])))

    @property
    def linkname(self) -> str:
        return self.pax.get("linkpath") or self._link or _text(self._header[157:257])


class TarStream:
    """The members of a tar stream (ustar, GNU or pax: sync.py's, or what ``tar c`` writes)
    read once, in order; standard library only, also used by the local side (filepipe.py).

    Iterating gives each :class:`Member` with long names, links, sizes and mtimes of GNU and
    pax headers applied; the member's payload is then read from this object (:meth:`read`,
    :meth:`readinto`, :meth:`chunks`), and what is not read is skipped. Trusts nothing: a
    bad checksum or a stream cut short raises :class:`BadTar`. (tarfile's stream mode
    copies each payload three times on the way; here it goes from the pipe's buffer to the
    file.)
    """

    def __init__(self, stream: Stream) -> None:
        self._stream = stream
        self._payload = 0  # bytes of the current member's payload not read yet
        self._padding = 0
        self._buffer = memoryview(bytearray(_CHUNK))

    def __iter__(self) -> Iterator[Member]:
        pax: dict[str, str] = {}
        long_name = long_link = ""
        read = self._stream.read
        while True:
            if self._payload or self._padding:
                self._exact(self._payload + self._padding)
            self._payload = self._padding = 0
            block = read(_BLOCK)
            if block == _ZERO_BLOCK:
                return
            if len(block) != _BLOCK:
                raise BadTar("the stream was cut short")
            # The sum of the header's bytes, its checksum field counted as spaces: adler32's
            # low half is 1 + that sum, mod 65521 (sum() over 512 bytes costs 30x as much).
            checksum = block[148:156]
            total = (zlib.adler32(block) & 0xFFFF) - 1 - sum(checksum) + 256
            if (_number(checksum) - total) % 65521:
                raise BadTar("a tar header with a bad checksum")
            kind, size = block[156:157], _number(block[124:136])
            if kind in _EXTENSIONS:
                if size > _HEADER_MAX:
                    raise BadTar("a tar header too long")
                data = self._exact(size + -size % _BLOCK)[:size]
                if kind == _PAX:
                    pax = _pax_records(data)
                elif kind == b"L":
                    long_name = _text(data)
                elif kind == b"K":
                    long_link = _text(data)
                continue
            name = pax.get("path") or long_name if pax or long_name else ""
            if not name:
                name = _text(block[:100])
                if block[345] and block[257:263] == b"ustar\0":  # POSIX ustar: a prefix
                    name = _text(block[345:500]) + "/" + name
            if "size" in pax:
                size = int(pax["size"])
                if size < 0:
                    raise BadTar("a tar header with a negative size")
            self._payload, self._padding = size, -size % _BLOCK
            yield Member(name, kind, size, block, pax, long_link)
            if pax or long_name or long_link:
                pax, long_name, long_link = {}, "", ""

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes of the current member's payload (all of it: -1)."""
        size = self._payload if size < 0 else min(size, self._payload)
        data = self._exact(size)
        self._payload -= size
        return data

    def readinto(self, buffer: memoryview) -> int:
        size = min(len(buffer), self._payload)
        if not size:
            return 0
        got = self._stream.readinto(buffer[:size])
        if not got:
            raise BadTar("the stream was cut short")
        self._payload -= got
        return int(got)

    def chunks(self) -> Iterator[memoryview]:
        """The rest of the current member's payload, in pieces of up to ``_CHUNK`` bytes,
        each valid until the next."""
        got = self.readinto(self._buffer)
        while got:  # (no walrus: this module runs on Python 3.7 too)
            yield self._buffer[:got]
            got = self.readinto(self._buffer)

    def _exact(self, size: int) -> bytes:
        data = self._stream.read(size) if size else b""
        if len(data) != size:
            raise BadTar("the stream was cut short")
        return data


class ReadAhead:
    """A pipe read ahead by a thread of its own into memory, up to ``limit`` bytes: while
    the files are written (a file's creation blocks for a while on some disks), the sender
    goes on sending, instead of waiting for the pipe and the SSH window to drain.
    :meth:`read` returns all it is asked for unless the stream ends; :meth:`readinto`
    what there is (at least a byte)."""

    def __init__(self, fd: int, limit: int = _READ_AHEAD) -> None:
        self._limit = limit
        self._chunks: collections.deque[bytes] = collections.deque()
        self._offset = 0  # into the first chunk
        self._size = 0  # bytes held
        self._ended = False
        self._error: OSError | None = None
        self._changed = threading.Condition()
        threading.Thread(target=self._fill, args=(fd,), daemon=True).start()

    def _fill(self, fd: int) -> None:
        changed = self._changed
        while True:
            with changed:
                while self._size >= self._limit:
                    changed.wait()
            try:
                data = os.read(fd, _CHUNK)
            except OSError as exc:
                data, self._error = b"", exc
            with changed:
                if data:
                    self._chunks.append(data)
                    self._size += len(data)
                else:
                    self._ended = True
                changed.notify_all()
            if not data:
                return

    def readinto(self, buffer: memoryview) -> int:
        with self._changed:
            while not self._chunks and not self._ended:
                self._changed.wait()
            if not self._chunks:
                if self._error is not None:
                    raise self._error
                return 0
            chunk = self._chunks[0]
            size = min(len(buffer), len(chunk) - self._offset)
            buffer[:size] = memoryview(chunk)[self._offset : self._offset + size]
            self._offset += size
            if self._offset == len(chunk):
                self._chunks.popleft()
                self._offset = 0
            self._size -= size
            self._changed.notify_all()
            return size

    def read(self, size: int) -> bytes:
        out = bytearray(size)
        view = memoryview(out)
        got = 0
        while got < size:
            more = self.readinto(view[got:])
            if not more:
                break
            got += more
        return bytes(view[:got])  # one copy, not two


def _number(field: bytes) -> int:
    """A tar header's number: octal text, or base-256 when its first bit is set."""
    if field[:1] and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0]
    try:
        return int(text, 8) if text.strip() else 0
    except ValueError:
        raise BadTar(f"a tar header with a bad number {text[:20]!r}") from None


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, str]:
    """``key=value`` of a pax header's ``"<length> <key>=<value>\\n"`` records."""
    records = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        try:
            end = pos + int(data[pos:space])
        except ValueError:
            raise BadTar("a bad pax record") from None
        if space < 0 or end <= space:
            raise BadTar("a bad pax record")
        key, _, value = data[space + 1 : end - 1].partition(b"=")
        records[_text(key)] = value.decode("utf-8", "surrogateescape")
        pos = end
    return records


def apply(tree: Tree, stream: Stream, stored: dict[str, Any]) -> dict[str, Any]:
    """Apply one sync tar read from ``stream``; return the manifest and stats to store."""
    tar = TarStream(stream)
    members = iter(tar)
    first = next(members, None)
    if first is None or first.kind not in _REGULAR:
        raise Refused("the first member must be the control JSON")
    receiver = Receiver(tree, stored, json.loads(tar.read()))
    for member in members:
        receiver.member(tar, member)
    return receiver.finish()


def save(store: str, stored: dict[str, Any]) -> None:
    tmp = store + ".tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(stored, separators=(",", ":")))
    os.replace(tmp, store)


def main(argv: list[str]) -> int:
    root = os.path.abspath(os.path.expanduser(argv[0])).rstrip("/") or "/"
    store = root + ".manifest.json"
    os.makedirs(root, exist_ok=True)
    stored = load(store, root)
    out = sys.stdout.buffer
    head = {"root": root, "manifest": stored["manifest"]}
    out.write(json.dumps(head, separators=(",", ":")).encode() + b"\n")
    out.flush()
    try:
        new = apply(Tree(root), ReadAhead(sys.stdin.fileno()), stored)
    except (Refused, zlib.error, ValueError, KeyError, OSError) as exc:
        sys.stderr.write(f"gpucloud receive: {exc}\n")
        return 1
    if new != stored:
        save(store, new)
    out.write(f"ok {root}\n".encode())
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
