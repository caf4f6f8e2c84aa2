"""Folders and files of this user only, on a machine other users share.

A folder at a predictable path (``$TMPDIR/pytest-gpucloud-<uid>``) can be made first by
another local user, or be a link to one of theirs; what runs in it could then import their
files. :func:`private_dir` makes the folder 0700, or refuses one that is a link, not ours
or open to others. :func:`private_file` writes a file 0600.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from pytest_gpucloud.core.errors import UnsafePath


def private_dir(path: Path, *, parents: bool = False, tighten: bool = False) -> Path:
    """``path``, a folder that only this user can enter, made (mode 0700) if missing.

    Raises :class:`UnsafePath` where it is a symbolic link, not a folder, owned by another
    user, or open to group or others. ``parents``: make missing parents too (0700).
    ``tighten``: a folder of ours open to others is made 0700 instead (one inside the
    project, made by an earlier version; never one in a shared folder such as /tmp)."""
    if parents:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        problem = "is a symbolic link"
    elif not stat.S_ISDIR(st.st_mode):
        problem = "is not a folder"
    elif st.st_uid != os.getuid():
        problem = f"belongs to another user (uid {st.st_uid})"
    elif st.st_mode & 0o077 and tighten:
        os.chmod(path, 0o700)
        return path
    elif st.st_mode & 0o077:
        problem = f"is open to other users (mode {stat.S_IMODE(st.st_mode):o})"
    else:
        return path
    raise UnsafePath(
        f"the folder {path} {problem}; it must be this user's own, mode 0700: remove it "
        "(another user may have made it first) and run again"
    )


def private_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (UTF-8), readable by this user only, in a private folder."""
    private_dir(path.parent, parents=True, tighten=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8", errors="replace") as file:
        os.fchmod(fd, 0o600)
        file.write(text)
