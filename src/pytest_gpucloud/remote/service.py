"""Runs a ``gpu_service`` command on the instance, and stops its whole process group.

Standalone (stdlib only, Python 3.8+): sent as the ``python3 -c`` program of one SSH exec,
in the workspace, inside the container if there is one. The first line of stdin is a JSON
object: ``cmd`` (a shell command line), ``log`` (the file its output goes to), ``env``
(added to its environment: values never travel on a command line), ``grace`` (seconds
between SIGTERM and SIGKILL), and ``relay``: null, or a Unix socket path (relative to the
workspace, so never too long) to listen on (mode 0600) and relay each connection to the
command's ``port`` on 127.0.0.1 here. A container with a network of its own is reached that
way: the socket is in the workspace, which the container shares with the instance, and SSH
forwards to it. Answers, one JSON
line each on stdout:

  {"pid": int}                     the command runs, in a process group of its own
  {"exited": int, "tail": str}     it ended by itself (negative: killed by that signal)
  {"stopped": int}                 stopped on request: a ``stop`` line, or stdin's end
                                   (the local side or its connection is gone)

Whatever ends the command, its process group gets SIGTERM, then SIGKILL after ``grace``
seconds if any of it is left, so no child of the server outlives it.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Any

TAIL_BYTES = 4000
CHUNK = 1 << 16


def main() -> None:
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    config = json.loads(sys.stdin.readline())
    grace = float(config["grace"])
    listener = listen(config["relay"]) if config["relay"] else None  # before the server
    with open(config["log"], "ab") as log:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", config["cmd"]],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, **config["env"]),
            start_new_session=True,
        )
    try:
        if listener is not None:
            threading.Thread(target=relay, args=(listener, config["port"]), daemon=True).start()
        say(out, pid=proc.pid)
        stop = threading.Event()
        threading.Thread(target=wait_for_stop, args=(stop,), daemon=True).start()
        while proc.poll() is None and not stop.wait(0.1):
            pass
        ended = proc.poll() is not None
    finally:  # whatever happens here, nothing of the server outlives its launcher's end
        end_group(proc, grace)
    if ended:
        say(out, exited=proc.returncode, tail=tail(config["log"]))
    else:
        say(out, stopped=proc.returncode)


def listen(path: str) -> socket.socket:
    if os.path.exists(path):
        os.unlink(path)  # left by an earlier session's launcher
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(path)
    finally:
        os.umask(old)
    listener.listen(64)
    return listener


def relay(listener: socket.socket, port: int) -> None:
    while True:
        client, _ = listener.accept()
        threading.Thread(target=bridge, args=(client, port), daemon=True).start()


def bridge(client: socket.socket, port: int) -> None:
    """Copy both ways between ``client`` and a new connection to ``port``, until both end."""
    try:
        upstream = socket.create_connection(("127.0.0.1", port))
    except OSError:
        client.close()  # as a refused connection, for the health poll
        return
    back = threading.Thread(target=pump, args=(upstream, client))
    back.start()
    pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while True:
            data = source.recv(CHUNK)
            if not data:
                break
            sink.sendall(data)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def wait_for_stop(stop: threading.Event) -> None:
    """Set ``stop`` at a ``stop`` line or at the end of stdin."""
    for line in sys.stdin:
        if line.strip() == "stop":
            break
    stop.set()


def end_group(proc: "subprocess.Popen[bytes]", grace: float) -> None:
    """SIGTERM to the command's process group, SIGKILL to what is left after ``grace`` s."""
    signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        proc.poll()  # reaped, the leader no longer counts as a member
        if not signal_group(proc.pid, 0):
            return
        time.sleep(0.05)
    signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


def signal_group(group: int, signum: int) -> bool:
    """Whether the group still had a member to signal."""
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        return False
    return True


def tail(path: str) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - TAIL_BYTES))
        return f.read().decode("utf-8", "replace")


def say(out: "IO[str]", **message: Any) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


if __name__ == "__main__":
    main()
