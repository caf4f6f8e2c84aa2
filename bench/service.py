"""gpu_service: the latency a request gains through the SSH forward, against the same
request made directly to the server on the instance's side.

One sim instance (the sim in a process of its own) runs the example's OpenAI-compatible
server (``examples/openai_server.py``) through ``gpu_service``, in a pytest session with
``--gpu-cloud``. Its test sends the same chat completion, on one keep-alive connection
each way, alternately through the forwarded port (``server.url``: this process -> SSH
channel -> the instance's sshd -> the server) and straight to the server's own port (the
sim's instances are processes of this machine, so that is the instance's side), in rounds,
and writes every latency to a file. The added latency is the difference of the medians.

Run: ``python bench/service.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

from simcloud import SimProcess

EXAMPLE_SERVER = Path(__file__).parent.parent / "examples" / "openai_server.py"
ROUNDS = 10
PER_ROUND = 100
NOTES: list[str] = []

_TEST = """
import json
import time

import httpx

BODY = {{"model": "tiny-chat", "messages": [{{"role": "user", "content": "What is a GPU?"}}]}}


def timed(client, url, n):
    times = []
    for _ in range(n):
        started = time.perf_counter()
        answer = client.post(url + "/v1/chat/completions", json=BODY)
        times.append(time.perf_counter() - started)
        assert answer.status_code == 200
    return times


def test_latency(gpu_service):
    server = gpu_service("python3 openai_server.py --port {port}", port={port}, spec="T4")
    direct = "http://127.0.0.1:{port}"
    found = {{"tunnel": [], "direct": []}}
    with httpx.Client(trust_env=False) as tunnel, httpx.Client(trust_env=False) as straight:
        timed(tunnel, server.url, 20)  # warm-up, both ways
        timed(straight, direct, 20)
        for _ in range({rounds}):
            found["tunnel"] += timed(tunnel, server.url, {per_round})
            found["direct"] += timed(straight, direct, {per_round})
    with open({out!r}, "w") as f:
        json.dump(found, f)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def measure() -> dict[str, list[float]]:
    project = Path(tempfile.mkdtemp(prefix="gpucloud-bench-service-"))
    out = project / "latency.json"
    try:
        shutil.copy2(EXAMPLE_SERVER, project / "openai_server.py")
        test = _TEST.format(port=_free_port(), rounds=ROUNDS, per_round=PER_ROUND, out=str(out))
        (project / "test_latency.py").write_text(textwrap.dedent(test))
        with SimProcess() as sim:
            done = subprocess.run(
                [
                    *(sys.executable, "-m", "pytest", "-q", "-p", "no:randomly"),
                    *("-p", "no:cacheprovider", "--gpu-cloud", "--gpu-provider", "rest"),
                ],
                cwd=project,
                env={**sim.env(), "PYTHONDONTWRITEBYTECODE": "1"},
                capture_output=True,
                text=True,
                timeout=600,
            )
        if done.returncode != 0:
            raise RuntimeError(f"the session failed:\n{done.stdout[-3000:]}{done.stderr[-2000:]}")
        found: dict[str, list[float]] = json.loads(out.read_text())
        return found
    finally:
        shutil.rmtree(project, ignore_errors=True)


def main() -> dict[str, Any]:
    load = os.getloadavg()[0]
    times = measure()
    tunnel = statistics.median(times["tunnel"]) * 1000
    direct = statistics.median(times["direct"]) * 1000
    added = tunnel - direct
    for name, values in times.items():
        ms = sorted(v * 1000 for v in values)
        print(
            f"service: {name:<6} median {statistics.median(ms):.3f} ms, "
            f"p90 {ms[int(len(ms) * 0.9)]:.3f} ms over {len(ms)} requests"
        )
    NOTES.append(
        f"{ROUNDS} rounds of {PER_ROUND} requests each way, interleaved, after 20 warm-up "
        f"requests each; medians: through the forward {tunnel:.3f} ms, direct {direct:.3f} "
        f"ms, added {added:.3f} ms per request (load average {load:.1f} at the start). Both "
        "ends are on this machine (the sim's instance is a process here), so the figure is "
        "the forward's own cost (SSH framing and encryption, asyncssh on both sides, one more "
        "process hop each way), without a network's round trip; a model's answer takes tens "
        "of milliseconds at least."
    )
    return {
        "name": "chat completion through the SSH forward (baseline: direct on the instance)",
        "value": round(tunnel, 3),
        "baseline": round(direct, 3),
        "ratio": round(tunnel / direct, 3),
        "target": None,
        "unit": "ms",
    }


if __name__ == "__main__":
    main()
