"""Receiving end of a code sync; runs on the instance as ``python3 -S -c <source> DIR``.

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

import contextlib
import json
import os
import sys
import zlib

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing, tarfile and shutil stay out of the startup, before the head line
    import tarfile
    from typing import IO, Any

PACK_HEADER = "GPUCLOUD.pack"
DIGESTS_HEADER = "GPUCLOUD.digests"
ZLIB_HEADER = "GPUCLOUD.zlib"
_CHUNK = 1 << 20


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

    def write(self, path: str, content: bytes | IO[bytes], entry: list[Any]) -> list[int]:
        """Write a file under a temporary name, then rename it; return its stat key."""
        tmp = self._temporary(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with open(fd, "wb") as out:
            if isinstance(content, bytes):
                out.write(content)
            else:
                for chunk in iter(lambda: content.read(_CHUNK), b""):
                    out.write(chunk)
            out.flush()
            os.fchmod(fd, entry[1] & 0o7777)
            os.utime(fd, ns=(entry[3], entry[3]))
            st = os.fstat(fd)
        _replace(tmp, path)
        return [st.st_size, st.st_mtime_ns, st.st_mode]

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

    def member(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        data = tar.extractfile(member) if member.isreg() else None
        headers = member.pax_headers
        if DIGESTS_HEADER in headers:
            self.digests = json.loads(headers[DIGESTS_HEADER])
        elif data is not None and PACK_HEADER in headers:
            payload = data.read()
            if ZLIB_HEADER in headers:
                payload = zlib.decompress(payload)
            offset = 0
            for name, size in json.loads(headers[PACK_HEADER]):
                self.put(name, payload[offset : offset + size])
                offset += size
            if offset != len(payload):
                raise Refused("a pack does not match its index")
        elif data is not None:
            self.put(member.name, data)
        elif member.issym():
            self.put(member.name, None, member.linkname)
        else:
            raise Refused(f"refused member {member.name!r}: not a regular file or symlink")

    def put(self, name: str, content: bytes | IO[bytes] | None, link: str = "") -> None:
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


def apply(tree: Tree, stream: IO[bytes], stored: dict[str, Any]) -> dict[str, Any]:
    """Apply one sync tar read from ``stream``; return the manifest and stats to store."""
    import tarfile

    try:
        with tarfile.open(fileobj=stream, mode="r|", bufsize=1 << 20) as tar:
            members = iter(tar)
            first = next(members, None)
            data = tar.extractfile(first) if first is not None and first.isreg() else None
            if data is None:
                raise Refused("the first member must be the control JSON")
            receiver = Receiver(tree, stored, json.loads(data.read()))
            for member in members:
                receiver.member(tar, member)
    except tarfile.TarError as exc:
        raise Refused(f"bad sync stream: {exc}") from None
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
        new = apply(Tree(root), sys.stdin.buffer, stored)
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
