"""Where a project's workspace lives on an instance.

A cloud instance is the session's alone: the workspace is ``gpucloud/<project>`` in its
login directory and goes with the instance. A machine that outlives the session (a leased
static host, this machine's GPUs) keeps a warm workspace per project and user instead
(:mod:`pytest_gpucloud.remote.workspaces`), so the next session's sync sends only what
changed. Its key names the user and the project's root by identity (path, device, inode,
this machine), never only by name: two projects or two users never share one.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import re
import socket
from pathlib import Path

from pytest_gpucloud.remote.workspaces import WORKSPACES


def remote_dir(rootdir: Path, *, warm: bool) -> str:
    """The workspace of ``rootdir``, relative to the login directory."""
    if not warm:
        return f"gpucloud/{rootdir.name}"
    return f"{WORKSPACES}/{workspace_key(rootdir)}"


def workspace_key(rootdir: Path) -> str:
    """``<project name>-<digest>``: the digest of this user, this machine and the root's
    real path and inode; one path segment."""
    real = rootdir.resolve()
    st = real.stat()
    user = [getpass.getuser(), str(os.getuid()), socket.gethostname()]
    identity = "\0".join([*user, os.fspath(real), str(st.st_dev), str(st.st_ino)])
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", real.name).lstrip(".")[:40] or "project"
    return f"{name}-{digest}"
