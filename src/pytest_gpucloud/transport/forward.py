"""Ports of an instance reached from 127.0.0.1 here, over an SSH connection it already has.

A local forward (``ssh -L``): a listener on a free port of this machine's loopback, each
of its connections a ``direct-tcpip`` channel to a port on the instance's loopback, or a
``direct-streamlocal`` channel to a Unix socket there. The instance opens no port to anyone.
"""

from __future__ import annotations

import contextlib
import shlex

from pytest_gpucloud.core.errors import InstanceError
from pytest_gpucloud.core.sshlib import asyncssh

LOOPBACK = "127.0.0.1"


async def forward_port(conn: asyncssh.SSHClientConnection, port: int) -> asyncssh.SSHListener:
    """A listener here whose connections reach ``port`` on the instance's loopback."""
    try:
        return await conn.forward_local_port(LOOPBACK, 0, LOOPBACK, port)
    except (OSError, asyncssh.Error) as exc:
        raise InstanceError(f"cannot forward port {port}: {exc}") from None


async def forward_socket(conn: asyncssh.SSHClientConnection, path: str) -> asyncssh.SSHListener:
    """A listener here whose connections reach the Unix socket ``path`` on the instance."""
    try:
        return await conn.forward_local_port_to_path(LOOPBACK, 0, path)
    except (OSError, asyncssh.Error) as exc:
        raise InstanceError(f"cannot forward to {path}: {exc}") from None


async def short_link(conn: asyncssh.SSHClientConnection, folder: str) -> str:
    """A private new folder in the instance's ``/tmp`` holding a link ``s`` to ``folder``:
    a short way to the sockets there (a socket's path has at most 107 bytes). Remove it
    with :func:`remove_link`."""
    made = f'd=$(mktemp -d /tmp/gpucloud.XXXXXX) && ln -s {shlex.quote(folder)} "$d/s"'
    try:
        done = await conn.run(f'{made} && echo "$d"', check=False)
    except (OSError, asyncssh.Error) as exc:
        raise InstanceError(f"no folder for a socket link in /tmp: {exc}") from None
    link_dir = str(done.stdout or "").strip()
    if done.exit_status != 0 or not link_dir.startswith("/tmp/gpucloud."):
        said = str(done.stderr or "").strip()[:200]
        raise InstanceError(f"no folder for a socket link in /tmp ({said!r})")
    return link_dir


async def remove_link(conn: asyncssh.SSHClientConnection, link_dir: str) -> None:
    """Remove a folder of :func:`short_link` (the linked folder stays)."""
    with contextlib.suppress(OSError, asyncssh.Error):  # the instance goes with the session
        await conn.run(f"rm -rf {shlex.quote(link_dir)}", check=False)
