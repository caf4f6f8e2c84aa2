"""Runs a ``gpu_service`` command on the instance, and stops its whole process group.

Standalone (stdlib only, Python 3.8+): sent as the ``python3 -c`` program of one SSH exec,
in the workspace, inside the container if there is one. The first line of stdin is a JSON
object: ``cmd`` (a shell command line), ``log`` (the file its output goes to), ``env``
(added to its environment: values never travel on a command line), ``grace`` (seconds
between SIGTERM and SIGKILL). Answers, one JSON line each on stdout:

  {"pid": int}                     the command runs, in a process group of its own
  {"exited": int, "tail": str}     it ended by itself (negative: killed by that signal)
  {"stopped": int}                 stopped on request: a ``stop`` line, or stdin's end
                                   (the local side or its connection is gone)

Whatever ends the command, its process group gets SIGTERM, then SIGKILL after ``grace``
seconds if any of it is left, so no child of the server outlives it.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import IO, Any

TAIL_BYTES = 4000


def main() -> None:
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    config = json.loads(sys.stdin.readline())
    grace = float(config["grace"])
    with open(config["log"], "ab") as log:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", config["cmd"]],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, **config["env"]),
            start_new_session=True,
        )
    say(out, pid=proc.pid)
    stop = threading.Event()
    threading.Thread(target=wait_for_stop, args=(stop,), daemon=True).start()
    while proc.poll() is None and not stop.wait(0.1):
        pass
    ended = proc.poll() is not None
    end_group(proc, grace)
    if ended:
        say(out, exited=proc.returncode, tail=tail(config["log"]))
    else:
        say(out, stopped=proc.returncode)


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
