"""Plain files through one stream: the instance sends, or receives, over one SSH exec.

Run on the instance as ``python3 -I -S -c <this source> send PATH MAX`` (instance -> here:
artifacts, ``get``) or ``... recv DIR`` (here -> instance: ``put``); the local side imports
the same functions for its end. Standard library only (Python >= 3.8), and no tarfile:
both ends are this module, so the format is the one that costs least per file.

The stream: one JSON line, the control ``{"kind": "dir"|"file"|"missing", "files": n,
"bytes": b, "left": [[name, size], ...], "skipped": [[name, why], ...]}``: what PATH was,
what the stream holds, the files left out to stay within MAX bytes (in name order, a file
that does not fit is left and the next tried) and the entries that are not regular files
(links, devices). Then batches: a JSON line ``[[name, size, mode, mtime], ...]`` followed
by the content of those files back to back. ``[]`` ends the stream; a stream without it was
cut short. Names are relative to PATH, ``/``-separated (a file PATH travels under its own
name).

:func:`extract` is the receiving end and trusts nothing in the stream: a name that is
absolute, has ``..``, or would land outside DIR through a link already there is refused and
listed, never written. Files are written new (never through a link) or replace an old one
by rename, with mode 0644 or 0755 and the sent mtime. More than ``max_bytes`` of content
stops the extraction.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import IO, Any

    from .receive import TarStream

    FileEntry = tuple[str, str, int, int, float]  # name in the stream, path, size, mode, mtime

_CHUNK = 1 << 20
_BAD_PARTS = frozenset(("", ".", ".."))
_BATCH_FILES = 1000
_LINE_MAX = 64 << 20  # one batch line: 1000 names of up to 4096 bytes, JSON-escaped
FILES_MAX = 20_000  # files of one stream, written or refused
DEPTH_MAX = 64  # folders a name may go down
REFUSED_MAX = 100  # refused names of one stream; past it the stream is broken off
# Never through a link, never over an existing file.
_MTIME_MAX = 2.0**33  # the year 2242; past it os.utime overflows on some systems
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)


class PipeRefused(Exception):
    """The stream cannot be taken: more bytes than allowed, cut short, or garbled."""


def walk(path: str) -> tuple[str, list[FileEntry], list[list[str]]]:
    """``(kind, files, skipped)`` for ``path``: its regular files, in name order, and
    ``[name, why]`` of the entries that are not (or could not be read)."""
    try:
        top = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return "missing", [], []
    if stat.S_ISREG(top.st_mode):
        name = os.path.basename(path.rstrip("/"))
        return "file", [(name, path, top.st_size, top.st_mode, top.st_mtime)], []
    if not stat.S_ISDIR(top.st_mode):
        return "missing", [], [[os.path.basename(path), "not a regular file or a folder"]]
    files: list[FileEntry] = []
    skipped: list[list[str]] = []
    pending = [("", path)]
    while pending:
        prefix, folder = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            skipped.append([prefix or ".", exc.strerror or str(exc)])
            continue
        for entry in entries:
            name = prefix + entry.name
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # gone since the listing
            if stat.S_ISDIR(st.st_mode):
                pending.append((name + "/", entry.path))
            elif stat.S_ISREG(st.st_mode):
                files.append((name, entry.path, st.st_size, st.st_mode, st.st_mtime))
            else:
                why = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
                skipped.append([name, why])
    files.sort()
    skipped.sort()
    return "dir", files, skipped


def choose(
    files: list[FileEntry], max_bytes: int | None
) -> tuple[list[FileEntry], list[list[Any]]]:
    """The files that fit in ``max_bytes`` (in name order), and ``[name, size]`` of the rest."""
    if max_bytes is None:
        return files, []
    chosen: list[FileEntry] = []
    left: list[list[Any]] = []
    total = 0
    for file in files:
        if total + file[2] <= max_bytes:
            chosen.append(file)
            total += file[2]
        else:
            left.append([file[0], file[2]])
    return chosen, left


def chunks(control: dict[str, Any], files: list[FileEntry]) -> Iterator[bytes]:
    """The stream: ``control``, then ``files`` in batches, in chunks of about 1 MiB.

    A file that shrank since it was listed is padded with zeros to its listed size, one that
    grew is cut to it: the stream never contradicts its own batch lines.
    """
    yield _line(control)
    start = 0
    while start < len(files):
        end, size = start, 0
        while end < len(files) and end - start < _BATCH_FILES and (end == start or size < _CHUNK):
            size += files[end][2]
            end += 1
        batch = files[start:end]
        out = bytearray(_line([[f[0], f[2], f[3] & 0o777, f[4]] for f in batch]))
        for _, path, size, _, _ in batch:
            with open(path, "rb") as f:
                remaining = size
                while remaining:
                    chunk = f.read(min(_CHUNK, remaining)) or bytes(min(_CHUNK, remaining))
                    remaining -= len(chunk)
                    out += chunk
                    if len(out) >= _CHUNK:
                        yield bytes(out)
                        out.clear()
        if out:
            yield bytes(out)
        start = end
    yield b"[]\n"


def _line(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8", "surrogateescape") + b"\n"


class _Dest:
    """The folder files are extracted into, with the checks that keep every write inside."""

    def __init__(self, root: str, private: bool = False) -> None:
        os.makedirs(root, mode=0o700 if private else 0o777, exist_ok=True)
        self.root = root
        self._mask = 0o700 if private else 0o777
        self.real = os.path.realpath(root)
        self._checked: set[str] = set()
        # Files are read into this and written from it: no copy of their content between.
        self._buffer = memoryview(bytearray(_CHUNK))

    def path(self, name: str) -> str:
        """Where ``name`` goes; ``ValueError`` with the reason if it may not."""
        parts = name.split("/")
        if "\0" in name or not _BAD_PARTS.isdisjoint(parts):  # also refuses "/abs"
            raise ValueError("absolute, empty or with '..'")
        folder, _, base = name.rpartition("/")
        parent = f"{self.root}/{folder}" if folder else self.root
        if parent not in self._checked:
            os.makedirs(parent, exist_ok=True)
            real = os.path.realpath(parent)
            if real != self.real and not real.startswith(self.real.rstrip("/") + "/"):
                raise ValueError("it goes through a link out of the folder")
            self._checked.add(parent)
        return f"{parent}/{base}"

    def write(self, path: str, body: _Body, mode: int, mtime: float) -> None:
        """Write a new file, or replace one through a temporary name and a rename."""
        mode = (0o755 if mode & 0o100 else 0o644) & self._mask
        try:
            fd = os.open(path, _NEW, mode)
        except FileExistsError:
            folder, base = os.path.split(path)
            tmp = os.path.join(folder, f".{base}.gpucloud~")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)  # left by an interrupted extraction
            self._fill(os.open(tmp, _NEW, mode), body, mtime)
            try:
                os.replace(tmp, path)
            except OSError:
                os.unlink(tmp)
                raise
        else:
            self._fill(fd, body, mtime)

    def _fill(self, fd: int, body: _Body, mtime: float) -> None:
        try:
            while size := body.readinto(self._buffer):
                view = self._buffer[:size]
                while view:
                    view = view[os.write(fd, view) :]
            os.utime(fd, (mtime, mtime))
        finally:
            os.close(fd)


class _Body:
    """The content of one file in the stream: exactly its size."""

    def __init__(self, stream: IO[bytes], size: int) -> None:
        self._stream = stream
        self.left = size

    def read(self, size: int) -> bytes:
        if not self.left:
            return b""
        data = self._stream.read(min(size, self.left))
        if not data:
            raise PipeRefused("the stream ended in the middle of a file")
        self.left -= len(data)
        return data

    def readinto(self, buffer: memoryview) -> int:
        if not self.left:
            return 0
        size = self._stream.readinto(buffer[: min(len(buffer), self.left)])  # type: ignore[attr-defined]
        if not size:
            raise PipeRefused("the stream ended in the middle of a file")
        self.left -= size
        return int(size)

    def skip(self) -> None:
        while self.read(_CHUNK):
            pass


def _read_line(stream: IO[bytes]) -> Any:
    line = stream.readline(_LINE_MAX)
    if not line.endswith(b"\n"):
        raise PipeRefused(
            "the stream was cut short" if len(line) < _LINE_MAX else "a line too long"
        )
    return json.loads(line.decode("utf-8", "surrogateescape"))


def _entries(stream: IO[bytes]) -> Iterator[tuple[str, int, int, float, bool]]:
    """``(name, size, mode, mtime, is a regular file)`` of each file of our own stream; the
    caller reads its :class:`_Body` before asking for the next."""
    while batch := _read_line(stream):
        if not isinstance(batch, list):
            raise PipeRefused("a batch line is not a list")
        for entry in batch:
            name, size, mode, mtime = entry
            if not (isinstance(name, str) and isinstance(size, int) and size >= 0):
                raise PipeRefused(f"a bad entry {entry!r:.200}")
            yield name, size, int(mode), float(mtime), True


_TAR_FILE_TYPES = (b"0", b"\0", b"7")


def _tar_entries(tar: TarStream) -> Iterator[tuple[str, int, int, float, bool]]:
    """The same of a tar stream (read by receive.py's :class:`TarStream`): member names less
    ``./``. Never trusted: a member that is not a regular file comes as one that is not, to
    be refused."""
    for member in tar:
        regular = member.kind in _TAR_FILE_TYPES
        size = member.size if regular else 0
        name = member.name[2:] if member.name.startswith("./") else member.name  # 3.8
        yield name, size, member.mode, member.mtime, regular


def extract(
    stream: IO[bytes],
    dest: str,
    max_bytes: int | None = None,
    *,
    tar: bool = False,
    max_files: int = FILES_MAX,
    private: bool = False,
) -> dict[str, Any]:
    """Write the files of a stream under ``dest``; never outside it (see the module doc).
    More than ``max_files`` entries, or than :data:`REFUSED_MAX` refused ones, break it off;
    a name deeper than :data:`DEPTH_MAX` folders, or with an mtime out of range, is refused.
    ``private``: files and the folder made are this user's only (0600, 0700).

    ``tar``: the stream is a tar stream (:func:`_tar_entries`), without a control line.
    Returns ``{"control": the control line ({} for tar), "files": n, "bytes": b,
    "refused": [[name, why], ...]}``. Raises :class:`PipeRefused` when the content passes
    ``max_bytes`` or the stream is garbled or cut short; the files written so far stay.
    """
    target = _Dest(dest, private)
    files = total = 0
    refused: list[list[str]] = []
    try:
        control = {} if tar else _read_line(stream)
        if not isinstance(control, dict):
            raise PipeRefused("the stream does not start with its control line")
        if tar:  # only here, never on the instance, where this module runs alone
            from .receive import TarStream

            stream = TarStream(stream)  # type: ignore[assignment,arg-type]  # reads like one
        entries = _tar_entries(stream) if tar else _entries(stream)  # type: ignore[arg-type]
        for count, (name, size, mode, mtime, regular) in enumerate(entries, 1):
            if count > max_files:
                raise PipeRefused(f"the stream holds more than the {max_files} files allowed")
            if len(refused) >= REFUSED_MAX:
                raise PipeRefused(f"the stream holds more than {REFUSED_MAX} refused names")
            why = _refusal(name, mtime, regular)
            if why:
                refused.append([name[:200], why])
                if regular:
                    _Body(stream, size).skip()
                continue
            if max_bytes is not None and total + size > max_bytes:
                raise PipeRefused(f"the stream holds more than the {max_bytes} bytes allowed")
            body = _Body(stream, size)
            try:
                target.write(target.path(name), body, mode, mtime)
            except (ValueError, OSError) as exc:
                refused.append([name, getattr(exc, "strerror", None) or str(exc)])
            else:
                files += 1
                total += size
            body.skip()
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise PipeRefused(f"a garbled stream: {exc}") from None
    return {"control": control, "files": files, "bytes": total, "refused": refused}


def _refusal(name: str, mtime: float, regular: bool) -> str:
    """Why the entry may not be written ("" if it may)."""
    if not regular:
        return "not a regular file"
    if name.count("/") >= DEPTH_MAX:
        return f"deeper than {DEPTH_MAX} folders"
    if not 0 <= mtime < _MTIME_MAX:  # also NaN
        return "an mtime out of range"
    return ""


def main(argv: list[str]) -> int:
    out = sys.stdout.buffer
    if argv[:1] == ["send"] and len(argv) == 3:
        limit = int(argv[2])
        kind, files, skipped = walk(os.path.expanduser(argv[1]))
        chosen, left = choose(files, None if limit < 0 else limit)
        control = {
            "kind": kind,
            "files": len(chosen),
            "bytes": sum(f[2] for f in chosen),
            "left": left,
            "skipped": skipped,
        }
        for chunk in chunks(control, chosen):
            out.write(chunk)
        out.flush()
        return 0
    if argv[:1] == ["recv"] and len(argv) == 2:
        try:
            result = extract(sys.stdin.buffer, os.path.expanduser(argv[1]))
        except (PipeRefused, OSError) as exc:
            sys.stderr.write(f"gpucloud filepipe: {exc}\n")
            return 1
        out.write(_line(result))
        out.flush()
        return 1 if result["refused"] else 0
    sys.stderr.write("usage: filepipe send PATH MAX | filepipe recv DIR\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
