"""What bring-up does on a machine between the code sync and the worker: the image and its
container, the setup command, the GPU health check; and what release undoes.

Every step is one remote command (:mod:`pytest_gpucloud.transport.commands`) of a command
line from :mod:`pytest_gpucloud.machine.runtime`, bounded in time, and raises
:class:`~pytest_gpucloud.core.errors.InstanceError` naming the instance.
Each returns a short note for the machine's status line.

The setup command runs once per container: a marker named by :func:`setup_key` (a hash of
the command, the files it names, the image, the container and the workspace) is written
where the setup's effects live, in the container's own ``~/.cache``. A machine that ran the
same setup already (a static host or GPU slot leased again) skips it.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import shlex
import time
from pathlib import Path

from pytest_gpucloud.core.errors import GpuMismatch, InstanceError
from pytest_gpucloud.core.escape import visible
from pytest_gpucloud.core.gpus import PROBE, Sighting, read_probe
from pytest_gpucloud.core.private import private_file
from pytest_gpucloud.core.sshlib import asyncssh
from pytest_gpucloud.machine.runtime import Runtime
from pytest_gpucloud.transport.capped import Captured, run_capped
from pytest_gpucloud.transport.commands import Shell

STEP_TIMEOUT_S = 60.0
#: The oldest Python the instance side runs on: ``remote/`` keeps to its syntax and library.
OLDEST_PYTHON = (3, 8)
# Any python3 runs it, Python 2 included.
_PYTHON_VERSION = """python3 -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])'"""
CLEAN_TIMEOUT_S = 20.0
# Files that decide what installing a project directory (``pip install -e .``) does.
_PROJECT_FILES = ("pyproject.toml", "setup.py", "setup.cfg")
_LOG_LINES = 15
OUTPUT_MAX = 8 << 20  # of each stream of a step: a setup's log keeps its last 8 MiB


async def run(shell: Shell, command: str, *, timeout: float, doing: str) -> Captured:
    """Run ``command``; its exit status is the caller's to judge, SSH trouble raises. Of
    its output, the last :data:`OUTPUT_MAX` bytes per stream are kept."""
    try:
        return await asyncio.wait_for(run_capped(shell, command, max_bytes=OUTPUT_MAX), timeout)
    except asyncio.TimeoutError:
        raise InstanceError(f"{doing} did not finish within {timeout:g} s") from None
    except (OSError, asyncssh.Error) as exc:
        raise InstanceError(f"{doing} failed: SSH: {str(exc) or type(exc).__name__}") from None


async def start_container(
    shell: Shell,
    runtime: Runtime,
    instance_id: str,
    *,
    pull_timeout: float,
    leftover: bool,
) -> tuple[str | None, list[str]]:
    """Fetch the image unless it is there, and start the container (``leftover``: remove one
    of the same name first, left by a session that ended badly on a static machine).

    Returns the container's id (None where the runtime runs none) and the notes."""
    notes: list[str] = []
    where = f"instance {instance_id}"
    present = runtime.has_image()
    if present is not None:
        found = await run(
            shell, present, timeout=STEP_TIMEOUT_S, doing=f"looking for the image on {where}"
        )
        if found.exit_status == 0:
            notes.append(f"image {runtime.image} present")
        else:
            pull = runtime.pull()
            if pull is None:
                raise InstanceError(f"{where} has no image {runtime.image} ({runtime.name})")
            started = time.monotonic()
            doing = f"pulling image {runtime.image} on {where}"
            pulled = await run(shell, pull, timeout=pull_timeout, doing=doing)
            if pulled.exit_status != 0:
                raise InstanceError(f"{doing} failed: {_last_line(pulled)}")
            notes.append(f"image {runtime.image} pulled in {time.monotonic() - started:.1f} s")
    start = runtime.start()
    if start is None:
        return None, notes
    remove = runtime.remove()
    if leftover and remove is not None:
        await run(
            shell, remove, timeout=CLEAN_TIMEOUT_S, doing=f"removing an old container on {where}"
        )
    doing = f"starting the {runtime.name} container on {where}"
    started_container = await run(shell, start, timeout=STEP_TIMEOUT_S, doing=doing)
    if started_container.exit_status != 0:
        raise InstanceError(f"{doing} failed: {runtime.explain(_last_line(started_container))}")
    lines = _text(started_container.stdout).split()
    notes.append(f"{runtime.name} container {runtime.container}")
    return (lines[-1] if lines else runtime.container), notes


def setup_key(command: str, rootdir: Path, *, runtime: Runtime, container_id: str | None) -> str:
    """The hash that says whether ``command`` ran in this container already: of the command,
    the content of the files it names (a directory: its pyproject.toml, setup.py and
    setup.cfg), the runtime, image, container and workspace."""
    digest = hashlib.sha256()
    for part in (command, runtime.name, runtime.image, container_id or "", runtime.workspace):
        digest.update(part.encode() + b"\0")
    root = rootdir.resolve()
    for path in _named_files(command, root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:24]


async def run_setup(
    shell: Shell,
    runtime: Runtime,
    instance_id: str,
    *,
    command: str,
    key: str,
    log: Path,
    timeout: float,
) -> str:
    """Run the setup command in the workspace unless the marker of ``key`` says it ran;
    keep its output in ``log``. Failure raises with the log's path and last lines."""
    marker = f'marker="${{XDG_CACHE_HOME:-$HOME/.cache}}/pytest-gpucloud/setup-{key}"'
    where = f"instance {instance_id}"
    done = await run(
        shell,
        runtime.wrap(f'{marker}; test -f "$marker"'),
        timeout=STEP_TIMEOUT_S,
        doing=f"looking for an earlier setup on {where}",
    )
    if done.exit_status == 0:
        return "setup cached"
    script = (
        f"cd {shlex.quote(runtime.workspace)} && sh -c {shlex.quote(command)} 2>&1 && "
        f'{marker} && mkdir -p "${{marker%/*}}" && : > "$marker"'
    )
    started = time.monotonic()
    try:
        result = await run(shell, runtime.wrap(script), timeout=timeout, doing=f"setup on {where}")
    except InstanceError as exc:
        _write_log(log, f"{exc}\n")
        raise InstanceError(f"setup failed on {where}: {exc}; log: {log}") from None
    output = _text(result.stdout) + _text(result.stderr)
    _write_log(log, ("[earlier output dropped]\n" if result.cut else "") + output)
    if result.exit_status != 0:
        tail = visible("\n".join(output.rstrip().splitlines()[-_LOG_LINES:]))
        raise InstanceError(
            f"setup failed on {where} (exit status {result.exit_status} of "
            f"{command!r}); its output is in {log}, ending:\n{tail}"
        )
    return f"setup ran in {time.monotonic() - started:.1f} s (log: {log})"


async def check_gpus(
    shell: Shell,
    runtime: Runtime,
    instance_id: str,
    *,
    gpu: str,
    count: int,
) -> str:
    """The health check in an exec of its own (see :func:`judge_gpus`)."""
    where = f"instance {instance_id}"
    probe = await run(
        shell, runtime.wrap(PROBE), timeout=STEP_TIMEOUT_S, doing=f"checking the GPUs of {where}"
    )
    sighting = read_probe(probe.exit_status, _text(probe.stdout), _text(probe.stderr))
    return judge_gpus(sighting, instance_id, gpu=gpu, count=count)


def judge_folded(said: str | None, instance_id: str, *, gpu: str, count: int) -> str:
    """The health check from :data:`PROBE` run in the worker's exec (its output, stderr
    included, then ``exit N``; see ``WorkerLink.launch``)."""
    if said is None:
        raise InstanceError(f"the worker on instance {instance_id} did not report its GPUs")
    output, _, status = said.rstrip("\n").rpartition("exit ")
    exit_status = int(status) if status.isdigit() else None
    sighting = read_probe(exit_status, output, "")
    return judge_gpus(sighting, instance_id, gpu=gpu, count=count)


def judge_gpus(sighting: Sighting, instance_id: str, *, gpu: str, count: int) -> str:
    """The health check: the machine shows at least ``count`` GPUs of type ``gpu``, as
    nvidia-smi sees them inside the runtime (or as the simulated cloud declares them)."""
    if not sighting.has(gpu, count):
        raise GpuMismatch(
            f"instance {instance_id} was asked for {count} x {gpu} but shows {sighting.describe()}"
        )
    return f"GPUs: {sighting.describe()}"


async def older_python(
    shell: Shell | None, runtime: Runtime | None, instance_id: str
) -> InstanceError | None:
    """After a failed bring-up: the error naming a python3 there (on the instance, then in
    its container) older than :data:`OLDEST_PYTHON`; None if there is none to blame."""
    if shell is None:
        return None
    commands = [_PYTHON_VERSION]
    if runtime is not None:
        commands = list(dict.fromkeys([*commands, runtime.wrap(_PYTHON_VERSION)]))
    for command in commands:
        try:
            done = await run(shell, command, timeout=STEP_TIMEOUT_S, doing="python3 --version")
        except InstanceError:
            return None
        found = re.fullmatch(r"(\d+)\.(\d+)\.\d+", _text(done.stdout).strip())
        if found and (int(found[1]), int(found[2])) < OLDEST_PYTHON:
            oldest = ".".join(map(str, OLDEST_PYTHON))
            return InstanceError(
                f"instance {instance_id}: python3 is Python {found[0]}, older than {oldest}, "
                "the oldest the plugin runs on an instance (use an image with a newer python3)"
            )
    return None


async def clean(shell: Shell, runtime: Runtime, instance_id: str) -> list[str]:
    """Remove the container, if any (the workspace stays: on a cloud instance it goes with
    the instance, on a machine that outlives the session it stays warm). Returns what
    failed, if anything."""
    remove = runtime.remove()
    if remove is None:
        return []
    doing = f"removing the {runtime.name} container on instance {instance_id}"
    try:
        result = await run(shell, remove, timeout=CLEAN_TIMEOUT_S, doing=doing)
    except InstanceError as exc:
        return [str(exc)]
    return [] if result.exit_status == 0 else [f"{doing} failed: {_last_line(result)}"]


def _named_files(command: str, root: Path) -> list[Path]:
    """The files under ``root`` (resolved) that ``command`` names."""
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    found: dict[Path, None] = {}
    for word in words:
        for part in {word, word.partition("=")[2]}:
            name = re.sub(r"\[[^\]]*\]$", "", part)  # .[test] names the directory .
            if not name or name.startswith("-"):
                continue
            path = (root / name).resolve()
            if not path.is_relative_to(root):
                continue
            if path.is_file():
                found[path] = None
            elif path.is_dir():
                project = (path / file for file in _PROJECT_FILES)
                found.update(dict.fromkeys(p for p in project if p.is_file()))
    return sorted(found)


def _write_log(log: Path, text: str) -> None:
    private_file(log, text)


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, str) else ""


def _last_line(result: Captured) -> str:
    said = (_text(result.stderr).strip() or _text(result.stdout).strip()).splitlines()
    return visible(said[-1][:300]) if said else f"exit status {result.exit_status}"
