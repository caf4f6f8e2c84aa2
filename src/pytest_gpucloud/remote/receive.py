"""Receiving end of a code sync; runs on the instance as ``python3 -c <this source> DIR``.

Standard library only (Python >= 3.8): it is sent as the source of the exec itself, before
anything of ours exists on the instance. ``DIR`` is absolute or relative to the login
directory. The exchange, all on the exec's stdin and stdout:

1. Prints one JSON line ``{"root": <absolute DIR>, "manifest": {path: entry}}``: the
   manifest stored by the last sync (in ``DIR.manifest.json``, next to the tree), less the
   paths whose file changed on disk since (size, mtime or mode), so they travel again.
2. Reads one pax tar. The first member is JSON ``{"removed": [...], "chmod": [...],
   "manifest": {...}}`` (paths to delete, files whose mode alone changed, the new
   manifest); the others are regular files, symlinks and packs. A pack holds many files
   back to back, listed in its pax header ``GPUCLOUD.pack`` as JSON ``[[path, size],
   ...]``; with the pax header ``GPUCLOUD.zlib`` its content is zlib-compressed.
3. Deletes the removed paths and the directories they leave empty, applies the chmods,
   writes each member (temporary name, then rename), sets its mode and mtime from the
   manifest, stores the new manifest atomically and prints ``ok <absolute DIR>``.

Refused, with exit status 1 and the reason on stderr: absolute paths, ``..``, paths
through a symlink that leaves the tree, symlinks pointing outside the tree, and any member
that is not a regular file or a symlink (devices, fifos, hard links, directories).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
import zlib
from typing import IO, Any

PACK_HEADER = "GPUCLOUD.pack"
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
            shutil.rmtree(path)
        parent = os.path.dirname(path)
        while parent != self.root:
            try:
                os.rmdir(parent)
            except OSError:
                break
            self._safe_dirs.discard(parent)
            parent = os.path.dirname(parent)

    def write(self, path: str, content: bytes | IO[bytes], entry: list[Any]) -> None:
        tmp = _temporary(path)
        with open(tmp, "wb") as out:
            if isinstance(content, bytes):
                out.write(content)
            else:
                shutil.copyfileobj(content, out, _CHUNK)
            os.fchmod(out.fileno(), entry[1] & 0o7777)
        os.utime(tmp, ns=(entry[3], entry[3]))
        _replace(tmp, path)

    def link(self, path: str, target: str) -> None:
        if target.startswith("/") or not self.inside(_realpath_via(path, target)):
            raise Refused(f"refused link {path!r} -> {target!r}: it points out of the tree")
        tmp = _temporary(path)
        os.symlink(target, tmp)
        _replace(tmp, path)


def _temporary(path: str) -> str:
    """A free name next to ``path``, its parent directories made."""
    parent, base = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{base}.gpucloud~")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    return tmp


def _realpath_via(path: str, target: str) -> str:
    return os.path.realpath(os.path.join(os.path.dirname(path), target))


def _replace(tmp: str, path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)  # something made a directory where the tree has a file
    os.replace(tmp, path)


def _stat_key(path: str) -> list[int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_mode]


def load(store: str, tree: Tree) -> dict[str, Any]:
    """The stored manifest, less the entries whose file changed on disk since."""
    try:
        with open(store, "rb") as f:
            stored = json.load(f)
        manifest, stats = stored["manifest"], stored["stat"]
    except (OSError, ValueError, KeyError, TypeError):
        return {"manifest": {}, "stat": {}}
    valid = {}
    for name, stat in stats.items():
        try:
            path = tree.path(name)
        except Refused:
            continue
        if name in manifest and _stat_key(path) == stat:
            valid[name] = stat
    return {"manifest": {k: manifest[k] for k in valid}, "stat": valid}


def apply(tree: Tree, stream: IO[bytes], stored: dict[str, Any]) -> dict[str, Any]:
    """Apply one sync tar read from ``stream``; return the manifest and stats to store."""
    with tarfile.open(fileobj=stream, mode="r|", bufsize=1 << 20) as tar:
        members = iter(tar)
        first = next(members, None)
        data = tar.extractfile(first) if first is not None and first.isreg() else None
        if data is None:
            raise Refused("the first member must be the control JSON")
        control = json.loads(data.read())
        manifest: dict[str, list[Any]] = control["manifest"]
        stats: dict[str, Any] = dict(stored["stat"])
        for name in control["removed"]:
            tree.remove(name)
            stats.pop(name, None)
        for name in control["chmod"]:
            path = tree.path(name)
            os.chmod(path, manifest[name][1] & 0o7777)
            stats[name] = _stat_key(path)

        links: list[tuple[str, str]] = []

        def put(name: str, content: bytes | IO[bytes] | None, link: str = "") -> None:
            path = tree.path(name)
            if name not in manifest:
                raise Refused(f"member {name!r} is not in the manifest")
            if content is None:
                tree.link(path, link)
                links.append((path, link))
            else:
                tree.write(path, content, manifest[name])
            stats[name] = _stat_key(path)

        for member in members:
            data = tar.extractfile(member) if member.isreg() else None
            index = member.pax_headers.get(PACK_HEADER)
            if data is not None and index is not None:
                payload = data.read()
                if ZLIB_HEADER in member.pax_headers:
                    payload = zlib.decompress(payload)
                offset = 0
                for name, size in json.loads(index):
                    put(name, payload[offset : offset + size])
                    offset += size
                if offset != len(payload):
                    raise Refused("a pack member does not match its index")
            elif data is not None:
                put(member.name, data)
            elif member.issym():
                put(member.name, None, member.linkname)
            else:
                raise Refused(f"refused member {member.name!r}: not a regular file or symlink")
    # A link can leave the tree through links that arrived after it: check them all again.
    for path, target in links:
        if not tree.inside(_realpath_via(path, target)):
            os.unlink(path)
            raise Refused(f"refused link {path!r} -> {target!r}: it points out of the tree")
    stats = {k: v for k, v in stats.items() if k in manifest and v is not None}
    return {"manifest": {k: manifest[k] for k in stats}, "stat": stats}


def save(store: str, stored: dict[str, Any]) -> None:
    tmp = store + ".tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(stored, separators=(",", ":")))
    os.replace(tmp, store)


def main(argv: list[str]) -> int:
    root = os.path.abspath(os.path.expanduser(argv[0])).rstrip("/") or "/"
    store = root + ".manifest.json"
    os.makedirs(root, exist_ok=True)
    tree = Tree(root)
    stored = load(store, tree)
    out = sys.stdout.buffer
    head = {"root": root, "manifest": stored["manifest"]}
    out.write(json.dumps(head, separators=(",", ":")).encode() + b"\n")
    out.flush()
    try:
        new = apply(tree, sys.stdin.buffer, stored)
    except (Refused, tarfile.TarError, zlib.error, ValueError, KeyError, OSError) as exc:
        sys.stderr.write(f"gpucloud receive: {exc}\n")
        return 1
    if new != stored:
        save(store, new)
    out.write(f"ok {root}\n".encode())
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
