"""The session's commands on a machine reached over OpenSSH, with the login shell paid once.

OpenSSH starts the user's login shell for every exec, and a ``.bashrc`` that runs ``pyenv
init`` or ``conda activate`` makes each cost 0.1-0.5 s. This program is started by one
exec (``python3 -I -S -c <source>``, standard library only, Python >= 3.8) and runs the
session's other commands itself, each as ``/bin/sh -c CMD`` in its own process group, in
the login directory, with the login shell's environment. Each command is one connection
to its Unix socket: the controller opens an SSH ``direct-streamlocal`` channel, and the
connection is the command's stdin and stdout.

The exchange:

- The hub's stdin: first the session's token (one line), then ``kill ID`` lines. Its end
  (the session or its SSH connection gone) kills every command still running and removes
  the socket.
- The hub's stdout: first ``hub PATH`` (the socket, in a new private folder of the temporary
  directory), or ``none WHY``. Then JSON lines ``{"id": ID, "err": TEXT}`` (a command's
  stderr, its bytes as latin-1) and, once its stderr has ended, ``{"id": ID, "exit": N}``
  (N < 0: killed by signal -N).
- A connection: first one JSON line ``{"token": ..., "id": ID, "command": CMD}``, then the
  command's stdin and stdout. A wrong token closes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading

SOCKET_PATH_MAX = 100  # of the 107 bytes a Unix socket's path may have
_HEAD_MAX = 1 << 20
_CHUNK = 1 << 16
_STDERR_GRACE_S = 1.0  # after a command's exit, for output a child of it still writes

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class Hub:
    """The commands of one session; see the module docstring."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.home = os.path.expanduser("~")
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self.lock = threading.Lock()

    def say(self, message: dict[str, Any]) -> None:
        line = json.dumps(message) + "\n"
        with self.lock:
            sys.stdout.write(line)
            sys.stdout.flush()

    def accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed at the end
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        """Run the command a connection asks for, with the connection as its stdin and
        stdout; relay its stderr and exit status."""
        with conn:
            try:
                request = json.loads(_head(conn))
            except (OSError, ValueError):
                return
            if not isinstance(request, dict) or request.get("token") != self.token:
                return
            number = int(request["id"])
            with self.lock:
                child = subprocess.Popen(
                    ["/bin/sh", "-c", str(request["command"])],
                    stdin=conn.fileno(),
                    stdout=conn.fileno(),
                    stderr=subprocess.PIPE,
                    cwd=self.home,
                    start_new_session=True,
                )
                self.children[number] = child
        assert child.stderr is not None
        relay = threading.Thread(target=self.relay, args=(number, child.stderr), daemon=True)
        relay.start()
        status = child.wait()
        relay.join(_STDERR_GRACE_S)
        self.say({"id": number, "exit": status})
        with self.lock:
            self.children.pop(number, None)

    def relay(self, number: int, stderr: Any) -> None:
        with stderr:
            while True:
                chunk = os.read(stderr.fileno(), _CHUNK)
                if not chunk:
                    return
                self.say({"id": number, "err": chunk.decode("latin-1")})

    def kill(self, number: int) -> None:
        with self.lock:
            child = self.children.get(number)
            if child is not None and child.poll() is None:
                with contextlib.suppress(OSError):
                    os.killpg(child.pid, signal.SIGKILL)

    def kill_all(self) -> None:
        with self.lock:
            numbers = list(self.children)
        for number in numbers:
            self.kill(number)


def _head(conn: socket.socket) -> bytes:
    """The connection's first line, read byte by byte: what follows is the command's."""
    head = bytearray()
    while len(head) < _HEAD_MAX:
        byte = conn.recv(1)
        if not byte:
            raise ValueError("no request")
        if byte == b"\n":
            return bytes(head)
        head += byte
    raise ValueError("request too long")


def _listen() -> tuple[socket.socket, str]:
    folder = tempfile.mkdtemp(prefix="gpucloud-hub-")  # 0700, this user's
    path = os.path.join(folder, "s")
    if len(path.encode()) > SOCKET_PATH_MAX:
        shutil.rmtree(folder, ignore_errors=True)
        raise OSError(f"the socket's path would be too long ({path})")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    return listener, path


def _leave(signum: int, frame: object) -> None:
    sys.exit(0)  # through main's cleanup


def main() -> int:
    signal.signal(signal.SIGTERM, _leave)
    signal.signal(signal.SIGHUP, _leave)
    token = sys.stdin.readline().strip()
    try:
        listener, path = _listen()
    except OSError as exc:
        print(f"none {exc}", flush=True)
        return 0
    hub = Hub(token)
    threading.Thread(target=hub.accept, args=(listener,), daemon=True).start()
    print(f"hub {path}", flush=True)
    try:
        for line in sys.stdin:
            words = line.split()
            if len(words) == 2 and words[0] == "kill" and words[1].isdigit():
                hub.kill(int(words[1]))
    finally:
        listener.close()
        hub.kill_all()
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
