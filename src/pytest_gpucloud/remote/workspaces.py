"""Warm workspaces on a machine that outlives the session (a static host, this machine).

A project's workspace is ``<home>/.cache/pytest-gpucloud/workspaces/<key>``, beside it
``<key>.manifest.json`` (the receiver's, written after every sync: its mtime says when the
workspace was last synced, which is when its idle time starts; one in use is never
removed, since its session holds the lease). The key names the project and the user on the
controlling machine, so a workspace is never shared between users or projects. Every
folder on the way must be private: owned by this user, mode 0700, not a symlink.

Run as a script (``python3 -S -c <this source> COMMAND ...``) on a static host:

- ``hold TTL [PROGRAM]``: take the host's lease lock (``lease.lock``; ``busy`` and exit when
  another session holds it), remove the workspaces idle for more than TTL seconds, say
  ``leased`` and hold the lock until stdin closes; or, given a PROGRAM, become
  ``python3 -I -S -c PROGRAM`` (the session's hub), which holds it as long as it runs. The
  lease is the workspaces' lock: no other session of this user uses any of them meanwhile.
- ``list``: one JSON line ``[[key, idle seconds, bytes], ...]``; ``remove KEY...`` (only
  while no session holds the lease: ``busy`` otherwise).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import stat
import sys
import time

BASE = ".cache/pytest-gpucloud"
WORKSPACES = BASE + "/workspaces"
MANIFEST = ".manifest.json"

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import IO


def private_dir(path: str) -> str | None:
    """Make ``path`` (and its missing parents) with mode 0700; None when it is private,
    else why not (a symlink, another owner, writable by others). A folder of this user that
    others may only read (an older version made it 0755) is tightened to 0700."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a folder but a link or a file"
    if st.st_uid != os.getuid():
        return f"{path} belongs to another user (uid {st.st_uid})"
    if st.st_mode & 0o022:
        mode = stat.S_IMODE(st.st_mode)
        return f"{path} is writable by other users (mode {mode:o}; chmod 700 it)"
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)  # this user's own folder, readable by others: tightened
    return None


def idle_times(base: str, now: float | None = None) -> list[tuple[str, float]]:
    """``[(key, idle seconds), ...]`` of the workspaces under ``base``, by key."""
    now = time.time() if now is None else now
    found: list[tuple[str, float]] = []
    try:
        names = sorted(os.listdir(base))
    except FileNotFoundError:
        return found
    for name in names:
        path = os.path.join(base, name)
        if name.endswith(MANIFEST) or not os.path.isdir(path) or os.path.islink(path):
            continue
        try:
            used = os.stat(path + MANIFEST).st_mtime
        except OSError:
            used = os.lstat(path).st_mtime
        found.append((name, max(0.0, now - used)))
    return found


def listing(base: str) -> list[tuple[str, float, int]]:
    """``[(key, idle seconds, bytes), ...]`` of the workspaces under ``base``, by key."""
    return [(key, idle, _size(os.path.join(base, key))) for key, idle in idle_times(base)]


def remove(base: str, keys: list[str]) -> None:
    """Remove the named workspaces under ``base`` (a key is one path segment)."""
    for key in keys:
        if not key or "/" in key or key in (".", ".."):
            raise ValueError(f"not a workspace key: {key!r}")
        shutil.rmtree(os.path.join(base, key), ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(base, key) + MANIFEST)


def sweep(base: str, ttl_s: float, now: float | None = None) -> list[str]:
    """Remove the workspaces idle for more than ``ttl_s``; returns their keys."""
    idle = [key for key, seconds in idle_times(base, now) if seconds > ttl_s]
    remove(base, idle)
    return idle


def _size(path: str) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def take_lease(home: str) -> IO[str] | str:
    """The lease lock of the machine whose login directory is ``home``, taken (held until
    the file closes); else what to answer (``busy``, ``refused: ...``)."""
    for folder in (os.path.join(home, BASE), os.path.join(home, WORKSPACES)):
        problem = private_dir(folder)
        if problem is not None:
            return "refused: " + problem
    lock = open(os.path.join(home, BASE, "lease.lock"), "a")  # noqa: SIM115 - held
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        return "busy"
    return lock


def answer(home: str, command: str, args: list[str]) -> str:
    """The answer to ``list`` or ``remove KEY...`` (see the module docstring)."""
    base = os.path.join(home, WORKSPACES)
    if command == "list":
        return json.dumps(listing(base))
    lock = take_lease(home)
    if isinstance(lock, str):
        return lock
    with lock:
        remove(base, args)
    return "removed"


def main(argv: list[str]) -> int:
    home = os.path.expanduser("~")
    command, args = argv[0], argv[1:]
    if command in ("list", "remove"):
        print(answer(home, command, args), flush=True)
        return 0
    if command != "hold":
        print(f"unknown command {command!r}", file=sys.stderr)
        return 2
    lock = take_lease(home)
    if isinstance(lock, str):
        print(lock, flush=True)
        return 0
    sweep(os.path.join(home, WORKSPACES), float(args[0]))
    print("leased", flush=True)
    if len(args) > 1:  # the lock goes on to the program that runs the session's commands
        os.set_inheritable(lock.fileno(), True)
        os.execv(sys.executable, [sys.executable, "-I", "-S", "-c", args[1]])
    sys.stdin.read()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
