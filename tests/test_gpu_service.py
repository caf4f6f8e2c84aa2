"""``gpu_service``: a server started on a fleet instance, its port forwarded here over the
fleet's SSH connection, health-polled, stopped with its whole process group, its log brought
home; across the plugin's modes (sim, xdist, ``local``, ``--gpu-plan``)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_gpucloud.core.errors import ServiceError
from pytest_gpucloud.features.gpu_service import GpuService
from pytest_gpucloud.features.service_desk import ServiceView
from tests.cloud import GpuRun, Sim, Standins, standin_gpus
from tests.engines import Engine

SERVER = Path(__file__).parent.parent / "examples" / "openai_server.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def refused(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    """A project that ships the example's OpenAI-compatible server."""
    shutil.copy2(SERVER, pytester.path / "openai_server.py")
    pytester.syspathinsert()
    return pytester


SERVED = """
import httpx
import pytest

from openai_server import reply_to

PORT = {port}


@pytest.fixture(scope="session")
def server(gpu_service):
    # a child in the server's process group, to see the whole group stopped
    command = (
        'sleep 300 & echo $! > {folder}/child.pid; echo "greeting=$GREETING"; '
        "exec python3 openai_server.py --port {port} --loading-s 1"
    )
    return gpu_service(command, port=PORT, spec="T4", env={{"GREETING": "hello there"}})


def test_reached_here_through_a_forward(server, gpu_service):
    assert server.url.startswith("http://127.0.0.1:")
    assert server.url != f"http://127.0.0.1:{{PORT}}"  # a forwarded port of this machine
    assert server.base_url == server.url + "/v1"
    assert httpx.get(server.url + "/health").json() == {{"status": "ok"}}
    assert "T4 i-" in server.gpu
    # the same definition is the same server
    again = gpu_service(server_command(), port=PORT, spec="T4", env={{"GREETING": "hello there"}})
    assert again.url == server.url


def server_command():
    return (
        'sleep 300 & echo $! > {folder}/child.pid; echo "greeting=$GREETING"; '
        "exec python3 openai_server.py --port {port} --loading-s 1"
    )


def test_a_hundred_chat_completions(server):
    client = server.openai_client()
    assert [m.id for m in client.models.list()] == ["tiny-chat"]
    for n in range(100):
        messages = [{{"role": "user", "content": f"question {{n}}"}}]
        answer = client.chat.completions.create(model="tiny-chat", messages=messages)
        assert answer.choices[0].message.content == reply_to(messages)


def test_its_logs(server):
    logs = server.logs()
    assert "greeting=hello there" in logs
    assert "serving tiny-chat on port {port}" in logs
    assert '"GET /health HTTP/1.1" 503' in logs  # polled while it loaded
"""


def test_a_server_on_an_instance_serves_the_tests_here(
    gpu_run: GpuRun, project: pytest.Pytester, sim: Sim, tmp_path: Path
) -> None:
    port = free_port()
    project.makepyfile(test_served=SERVED.format(port=port, folder=tmp_path))
    before = {i["id"] for i in sim.instances()}
    result = gpu_run("-p", "no:randomly")
    result.assert_outcomes(passed=3)
    [instance] = [i for i in sim.instances() if i["id"] not in before]
    assert instance["status"] == "terminated"
    result.stdout.fnmatch_lines([f"{instance['id']}   T4 *", "total: 1 instance(s)*"])
    # the server is stopped, its child too (the whole process group)
    assert refused(port)
    child = int((tmp_path / "child.pid").read_text())
    assert not _alive(child)
    # its log came home
    [log] = project.path.glob(".gpucloud/artifacts/*/gpu_service/*.log")
    text = log.read_text()
    assert text.count('"POST /v1/chat/completions HTTP/1.1" 200') == 100
    # the command never travelled with the environment's values on its command line
    launched = [c for c in instance["commands"] if "gpucloud/services" in c["command"]]
    assert launched
    assert all("hello there" not in c["command"] for c in launched)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_server_that_exits_fails_its_users_at_once_quoting_its_log(
    gpu_run: GpuRun, project: pytest.Pytester, sim: Sim
) -> None:
    project.makeconftest(
        """
        import pytest

        @pytest.fixture(scope="session")
        def server(gpu_service):
            command = "echo loading weights; echo CUDA out of memory >&2; exit 3"
            return gpu_service(command, port=9, spec="T4", timeout=600)
        """
    )
    project.makepyfile(
        """
        def test_one(server):
            pass

        def test_two(server):
            pass

        def test_local():
            pass
        """
    )
    before = {i["id"] for i in sim.instances()}
    result = gpu_run("-p", "no:randomly")
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*gpu-cloud: gpu_service('echo loading weights;*') on T4 i-* ended before /health "
            "answered 200: exit status 3; its log ends:",
            "*    loading weights",
            "*    CUDA out of memory",
            "(the whole log comes home to */gpu_service/echo-*.log)",
            "*gpu-cloud: 2 infrastructure error(s)*",
        ]
    )
    assert "Traceback" not in result.stdout.str()
    # one try: the failed start is not repeated for the second test
    assert len([i for i in sim.instances() if i["id"] not in before]) == 1
    [log] = project.path.glob(".gpucloud/artifacts/*/gpu_service/*.log")
    assert "CUDA out of memory" in log.read_text()


def test_a_health_timeout_says_how_long_it_waited_and_the_last_answer(
    gpu_run: GpuRun, project: pytest.Pytester
) -> None:
    port = free_port()
    project.makepyfile(
        f"""
        def test_waits(gpu_service):
            gpu_service(
                "python3 openai_server.py --port {port} --loading-s 600",
                port={port},
                timeout=1.5,
            )
        """
    )
    result = gpu_run()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*gpu-cloud: gpu_service(*) on T4 i-*: /health did not answer 200 within 1.5 s "
            '(waited *s); the last answer: HTTP 503 \'{"status": "loading"}\'; its log ends:',
            f"*serving tiny-chat on port {port}",
        ]
    )
    assert refused(port)


def test_xdist_workers_share_the_controllers_server(
    gpu_run: GpuRun, project: pytest.Pytester, sim: Sim, tmp_path: Path
) -> None:
    port = free_port()
    project.makeconftest(
        f"""
        import pytest

        @pytest.fixture(scope="session")
        def server(gpu_service):
            return gpu_service("python3 openai_server.py --port {port}", port={port}, spec="T4")
        """
    )
    test = f"""
        import os
        import pathlib

        def test_chat(server):
            client = server.openai_client()
            messages = [{{"role": "user", "content": "hi"}}]
            answer = client.chat.completions.create(model="tiny-chat", messages=messages)
            assert answer.choices[0].message.content
            assert "serving tiny-chat" in server.logs()
            worker = os.environ["PYTEST_XDIST_WORKER"]
            pathlib.Path({str(tmp_path)!r}, worker).write_text(server.url)
        """
    project.makepyfile(test_a=test, test_b=test)
    before = {i["id"] for i in sim.instances()}
    result = gpu_run.subprocess("-n", "2", "--dist", "loadfile")
    result.assert_outcomes(passed=2)
    urls = {path.read_text() for path in tmp_path.glob("gw*")}
    assert len(list(tmp_path.glob("gw*"))) == 2
    assert len(urls) == 1
    assert len([i for i in sim.instances() if i["id"] not in before]) == 1
    assert refused(port)


def test_local_provider_needs_no_tunnel(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    folder = tmp_path / "smi-bin"
    folder.mkdir()
    shutil.copy2(Path(__file__).parent / "standins" / "nvidia-smi", folder / "nvidia-smi")
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STANDIN_NVIDIA_GPUS", standin_gpus("NVIDIA L4"))
    port = free_port()
    project.makepyfile(
        f"""
        import httpx

        def test_direct(gpu_service):
            server = gpu_service("python3 openai_server.py --port {port}", port={port}, spec="L4")
            assert server.url == "http://127.0.0.1:{port}"
            assert httpx.get(server.url + "/v1/models").json()["data"][0]["id"] == "tiny-chat"
        """
    )
    result = project.runpytest_inprocess("--gpu-cloud", "--gpu-provider", "local")
    result.assert_outcomes(passed=1)
    assert refused(port)


def test_the_plan_lists_the_servers_instance(
    gpu_run: GpuRun, project: pytest.Pytester, sim: Sim
) -> None:
    project.makeconftest(
        """
        import pytest

        @pytest.fixture(scope="session")
        def llm(gpu_service):
            return gpu_service("vllm serve Qwen/Qwen3-0.6B --port 8000", port=8000, spec="L4")
        """
    )
    project.makepyfile(
        """
        import pytest

        def test_chat(llm):
            pass

        @pytest.mark.gpu("T4")
        def test_on_t4():
            pass
        """
    )
    before = {i["id"] for i in sim.instances()}
    result = gpu_run("--gpu-plan")
    assert result.ret == 0
    result.stdout.fnmatch_lines(
        [
            "plan: 2 instance(s)*",
            "  T4 in * at $0.53/h: 1 test(s), *",
            "  L4 in * at $0.70/h: gpu_service('vllm serve Qwen/Qwen3-0.6B --port 8000'), boot * "
            "s + the session * s = * s, $*",
            "--gpu-plan: no instance was created and no test ran",
        ]
    )
    assert not [i for i in sim.instances() if i["id"] not in before]


def test_without_gpu_cloud_its_users_are_skipped(project: pytest.Pytester) -> None:
    project.makepyfile(
        """
        def test_chat(gpu_service):
            gpu_service("python3 openai_server.py --port 8000", port=8000)
        """
    )
    result = project.runpytest_inprocess("-rs")
    result.assert_outcomes(skipped=1)


BAD_CALLS = {
    'gpu_service("serve", port="8000")': "port='8000' must be a TCP port number (1-65535)",
    'gpu_service("serve", port=8000, health="health")': "health='health' must be a path *",
    'gpu_service("serve", port=8000, env={"A": 1})': "env must map variable names to strings",
    'gpu_service("serve", port=8000, timeout=0)': "timeout=0 must be a positive number *",
    'gpu_service("serve", port=8000, spec="NOPE-GPU")': "*NOPE-GPU*",
}


def test_bad_arguments_are_one_line_setup_errors(
    gpu_run: GpuRun, project: pytest.Pytester, sim: Sim
) -> None:
    tests = [
        f"""
@pytest.fixture
def server_{n}(gpu_service):
    return {call}

def test_{n}(server_{n}):
    pass
"""
        for n, call in enumerate(BAD_CALLS)
    ]
    project.makepyfile("import pytest\n" + "".join(tests))
    before = {i["id"] for i in sim.instances()}
    result = gpu_run("-p", "no:randomly")
    result.assert_outcomes(errors=len(BAD_CALLS))
    result.stdout.fnmatch_lines(
        [f"gpu-cloud: gpu_service('serve'): {m}" for m in BAD_CALLS.values()]
    )
    assert not [i for i in sim.instances() if i["id"] not in before]


def test_openai_client_needs_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openai", None)
    view = ServiceView("k", "http://127.0.0.1:1", "i-1", "T4 i-1", "log")
    service = GpuService(access=None, view=view)  # type: ignore[arg-type]  # not reached
    with pytest.raises(ServiceError, match=r"pip install 'pytest-gpucloud\[openai\]'"):
        service.openai_client()


def test_in_a_container_it_starts_through_exec_and_is_reached_through_a_relay(
    gpu_run: GpuRun, project: pytest.Pytester, standins: Standins
) -> None:
    # docker and podman give a container a network of its own: the server's port there is
    # reached through the launcher's Unix socket in the (shared) workspace.
    port = free_port()
    project.makepyfile(
        f"""
        from openai_server import reply_to

        def test_chat(gpu_service):
            server = gpu_service("python3 openai_server.py --port {port}", port={port})
            client = server.openai_client()
            for n in range(10):
                messages = [{{"role": "user", "content": str(n)}}]
                answer = client.chat.completions.create(model="tiny-chat", messages=messages)
                assert answer.choices[0].message.content == reply_to(messages)
        """
    )
    result = gpu_run("--gpu-runtime", "podman")
    result.assert_outcomes(passed=1)
    [launch] = [
        c["argv"] for c in standins.calls("podman") if "gpucloud/services" in " ".join(c["argv"])
    ]
    assert launch[:2] == ["exec", "-i"]
    assert refused(port)
    [log] = project.path.glob(".gpucloud/artifacts/*/gpu_service/*.log")
    assert log.read_text().count("POST /v1/chat/completions") == 10


def test_a_stopped_server_asked_for_again_starts_anew(
    gpu_run: GpuRun, project: pytest.Pytester, sim: Sim
) -> None:
    port = free_port()
    project.makepyfile(
        f"""
        import socket

        def test_stop_and_again(gpu_service):
            first = gpu_service("python3 openai_server.py --port {port}", port={port})
            first.stop()
            with socket.socket() as sock:
                assert sock.connect_ex(("127.0.0.1", {port})) != 0  # gone on the instance
            again = gpu_service("python3 openai_server.py --port {port}", port={port})
            assert again.instance != first.instance
            assert "serving tiny-chat" in again.logs()
        """
    )
    before = {i["id"] for i in sim.instances()}
    gpu_run().assert_outcomes(passed=1)
    assert len([i for i in sim.instances() if i["id"] not in before]) == 2
    assert len(list(project.path.glob(".gpucloud/artifacts/*/gpu_service/*.log"))) == 1


def test_a_signal_mid_session_deletes_the_servers_instance(
    gpu_run: GpuRun, project: pytest.Pytester, sim: Sim, tmp_path: Path
) -> None:
    port = free_port()
    project.makepyfile(
        f"""
        import pathlib
        import time

        def test_long(gpu_service):
            gpu_service("python3 openai_server.py --port {port}", port={port})
            pathlib.Path({str(tmp_path / "up")!r}).touch()
            time.sleep(120)
        """
    )
    before = {i["id"] for i in sim.instances()}
    command = [sys.executable, "-m", "pytest", *gpu_run.args()]
    with (project.path / "out.txt").open("wb") as out:
        session = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=project.path)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "up").exists():
            assert session.poll() is None, (project.path / "out.txt").read_text()
            assert time.monotonic() < deadline, "the server never came up"
            time.sleep(0.1)
        session.send_signal(signal.SIGTERM)
        assert session.wait(60) == pytest.ExitCode.INTERRUPTED
    finally:
        session.kill()
    assert "Traceback" not in (project.path / "out.txt").read_text()
    [instance] = [i for i in sim.instances() if i["id"] not in before]
    assert instance["id"] not in [i["id"] for i in sim.live()]
    assert refused(port)


def test_podman_a_server_in_a_container_without_a_network_is_reached_through_the_relay(
    podman_engine: Engine, gpu_run: GpuRun, project: pytest.Pytester, sim: Sim
) -> None:
    # The tests' podman gives containers no network (netns none): the server's port exists
    # only inside the container, and the launcher's socket in the workspace is the way in.
    port = free_port()
    project.makepyfile(
        f"""
        import socket

        from openai_server import reply_to

        def test_chat(gpu_service):
            command = (
                "test -e /run/.containerenv && echo inside a container; "
                "exec python3 openai_server.py --port {port}"
            )
            server = gpu_service(command, port={port}, spec="T4")
            with socket.socket() as sock:  # not on this machine's loopback
                assert sock.connect_ex(("127.0.0.1", {port})) != 0
            client = server.openai_client()
            for n in range(10):
                messages = [{{"role": "user", "content": str(n)}}]
                answer = client.chat.completions.create(model="tiny-chat", messages=messages)
                assert answer.choices[0].message.content == reply_to(messages)
            assert "inside a container" in server.logs()
        """
    )
    before = {i["id"] for i in sim.instances()}
    sim.configure(extra_path=str(podman_engine.path))
    try:
        result = gpu_run("--gpu-runtime", "podman", "--gpu-image", podman_engine.image)
    finally:
        sim.configure(extra_path=None)
    result.assert_outcomes(passed=1)
    [instance] = [i for i in sim.instances() if i["id"] not in before]
    assert podman_engine.containers(f"gpucloud-{instance['id']}") == []
    [log] = project.path.glob(".gpucloud/artifacts/*/gpu_service/*.log")
    assert log.read_text().count("POST /v1/chat/completions") == 10
