"""The session's commands on a machine reached over OpenSSH, with the login shell paid once.

OpenSSH starts the user's login shell for every exec, and a ``.bashrc`` that runs ``pyenv
init`` or ``conda activate`` makes each cost 0.1-0.5 s. This program is started by one
exec (``python3 -I -S -c <source>``, standard library only, Python >= 3.8; on a static host
the lease's ``hold`` becomes it, and it holds the lease) and runs the session's other
commands itself, each as ``/bin/sh -c CMD`` in its own process group, in the login
directory, with the login shell's environment. Each command is one connection
to its Unix socket: the controller opens an SSH ``direct-streamlocal`` channel, and the
connection is the command's stdin and stdout.

The exchange:

- The hub's stdin: first the session's token (one line), then ``kill ID`` lines. Its end
  (the session or its SSH connection gone) kills every command still running and removes
  the socket.
- The hub's stdout: first ``hub PATH`` (the socket, in a new private folder of the temporary
  directory), or ``none WHY`` (it then only waits for its stdin's end). Then JSON lines
  ``{"id": ID, "err": TEXT}`` (a command's stderr, its bytes as latin-1) and, once it has
  exited and its stderr ended (or a second later), ``{"id": ID, "exit": N}`` (N < 0:
  killed by signal -N).
- A connection: first one JSON line ``{"token": ..., "id": ID, "command": CMD}``, then the
  command's stdin and stdout. A wrong token closes it.
"""

from __future__ import annotations

import contextlib  # (subprocess imports it anyway)
import json
import os
import signal
import socket
import subprocess
import sys
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
        self.killed: set[int] = set()  # also those whose connection came after the kill
        self.ending = False  # no more commands
        self.lock = threading.Lock()  # of children, killed and ending
        self.out = threading.Lock()  # of stdout

    def say(self, message: dict[str, Any]) -> None:
        line = json.dumps(message) + "\n"
        with self.out:
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
            with self.lock:  # a spawn is over, its child known, before kill_all looks
                if number in self.killed:  # before its connection came
                    self.say({"id": number, "exit": -signal.SIGKILL})
                    return
                if self.ending:
                    return
                try:
                    child = subprocess.Popen(
                        ["/bin/sh", "-c", str(request["command"])],
                        stdin=conn.fileno(),
                        stdout=conn.fileno(),
                        stderr=subprocess.PIPE,
                        cwd=self.home,
                        start_new_session=True,
                    )
                except OSError as exc:  # no /bin/sh, no process or file left
                    self.say({"id": number, "err": f"gpucloud hub: {exc}\n"})
                    self.say({"id": number, "exit": 127})
                    return
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
            self.killed.add(number)
            child = self.children.get(number)
            if child is not None and child.poll() is None:
                with contextlib.suppress(OSError):
                    os.killpg(child.pid, signal.SIGKILL)

    def kill_all(self) -> None:
        with self.lock:
            self.ending = True
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
    """A listening socket in a new folder of the temporary directory, 0700 and this user's
    (``mkdir`` fails on anything already there); the folder is left to :func:`_remove`."""
    temporary = os.environ.get("TMPDIR") or "/tmp"
    folder = os.path.join(temporary, "gpucloud-hub-" + os.urandom(8).hex())
    path = os.path.join(folder, "s")
    if len(path.encode()) > SOCKET_PATH_MAX:
        raise OSError(f"the socket's path would be too long ({path})")
    os.mkdir(folder, 0o700)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
    except OSError:
        listener.close()
        _remove(path)
        raise
    listener.listen(16)
    return listener, path


def _remove(path: str) -> None:
    for remove, name in ((os.unlink, path), (os.rmdir, os.path.dirname(path))):
        with contextlib.suppress(OSError):
            remove(name)


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
        sys.stdin.read()  # a lease handed on to this process ends with the session
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
        _remove(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
