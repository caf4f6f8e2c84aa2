"""Container runtimes: the command lines that bring a machine's image up around its
workspace, run a command inside it, and take it down again.

Pure: each method returns one shell command line (for one SSH exec on the machine), or None
where the runtime has no such step. The workspace is mounted at its own path, so paths are
the same inside the container and out, and nothing else of the machine is shared.

- ``docker``: one container per machine, ``run -d --gpus all ... sleep infinity``; each
  command an ``exec -i`` into it; ``rm -f`` at the end.
- ``podman``: the same, with the GPUs as CDI devices (``--device nvidia.com/gpu=all``: the
  machine needs a CDI spec, ``nvidia-ctk cdi generate``; podman 4's ``--gpus`` is accepted
  and ignored), and ``rm -f -t 0``: ``sleep`` as the container's first process ignores
  SIGTERM, and podman would wait 10 s before it kills it.
- ``apptainer``: the image is pulled once into a SIF file beside the workspace; each command
  is an ``exec --nv`` with the workspace bound. Nothing runs between commands: nothing to
  remove.
- ``none``: commands run on the machine as they are.

A container gets the GPUs only on a machine with an NVIDIA driver (``/dev/nvidiactl``): the
engines refuse GPU flags elsewhere, and the GPU check then says what the machine lacks.
``CUDA_VISIBLE_DEVICES`` travels into containers where the machine sets it (a GPU slot of
the ``local`` provider), so a container sees the machine's slot and no other GPU; so does
the simulated cloud's declaration of its GPUs (``GPUCLOUD_SIM_GPU``), for the GPU check.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import shlex
from dataclasses import dataclass
from typing import ClassVar

from pytest_gpucloud.core.gpus import SIM_ENV

RUNTIMES = ("none", "docker", "podman", "apptainer")
# Where the NVIDIA driver is loaded, this device exists.
DRIVER_DEVICE = "/dev/nvidiactl"


@dataclass(frozen=True)
class Runtime:
    """The ``none`` runtime, and the base of the others.

    ``image``: what the container runs; ``workspace``: the synced workspace's absolute
    path on the machine; ``container``: the container's name (docker, podman).
    """

    image: str
    workspace: str
    container: str
    name: ClassVar[str] = "none"

    def has_image(self) -> str | None:
        """A command that succeeds when the image is on the machine already."""
        return None

    def pull(self) -> str | None:
        """A command that fetches the image."""
        return None

    def start(self) -> str | None:
        """A command that starts the container; its output is the container's id."""
        return None

    def wrap(self, command: str) -> str:
        """``command`` (a shell command line) run inside the container, in the workspace."""
        return command

    def remove(self) -> str | None:
        """A command that removes the container and whatever still runs in it."""
        return None

    def explain(self, said: str) -> str:
        """What the runtime ``said`` when its container did not start, with the fix where
        it is a known one."""
        return said


@dataclass(frozen=True)
class Docker(Runtime):
    name: ClassVar[str] = "docker"
    gpu_flags: ClassVar[tuple[str, ...]] = ("--gpus", "all")
    run_flags: ClassVar[tuple[str, ...]] = ()
    # The error of a start with GPUs asked for that the engine cannot give, and its fix.
    gpu_error: ClassVar[str] = 'could not select device driver "" with capabilities: [[gpu]]'
    gpu_fix: ClassVar[str] = (
        "docker reaches the GPUs through the NVIDIA Container Toolkit: install it on the "
        "machine (nvidia-ctk runtime configure --runtime=docker, then restart dockerd)"
    )

    def has_image(self) -> str:
        return shlex.join([self.name, "image", "inspect", "--format", "{{.Id}}", self.image])

    def pull(self) -> str:
        return shlex.join([self.name, "pull", "-q", self.image])

    def start(self) -> str:
        ws = self.workspace
        gpus = f"gpus=; test -e {DRIVER_DEVICE} && gpus={shlex.quote(shlex.join(self.gpu_flags))}"
        run = shlex.join([self.name, "run", "-d", "--name", self.container])
        return f"{gpus}; {run} $gpus " + shlex.join(
            [
                *self.run_flags,
                "--ipc=host",  # PyTorch's DataLoader workers share memory through /dev/shm
                "-e",
                "CUDA_VISIBLE_DEVICES",
                "-e",
                SIM_ENV,
                "-v",
                f"{ws}:{ws}",
                "-w",
                ws,
                "--entrypoint",
                "sleep",
                self.image,
                "infinity",
            ]
        )

    def wrap(self, command: str) -> str:
        ws = self.workspace
        return shlex.join([self.name, "exec", "-i", "-w", ws, self.container, "sh", "-c", command])

    def remove(self) -> str:
        return shlex.join([self.name, "rm", "-f", self.container])

    def explain(self, said: str) -> str:
        return f"{said} ({self.gpu_fix})" if self.gpu_error in said else said


@dataclass(frozen=True)
class Podman(Docker):
    name: ClassVar[str] = "podman"
    gpu_flags: ClassVar[tuple[str, ...]] = ("--device", "nvidia.com/gpu=all")
    run_flags: ClassVar[tuple[str, ...]] = ("--security-opt=label=disable",)
    gpu_error: ClassVar[str] = "unresolvable CDI devices nvidia.com/gpu=all"
    gpu_fix: ClassVar[str] = (
        "podman reaches the GPUs as CDI devices: generate their spec on the machine with "
        "nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml"
    )

    def remove(self) -> str:
        return shlex.join([self.name, "rm", "-f", "-t", "0", self.container])


@dataclass(frozen=True)
class Apptainer(Runtime):
    name: ClassVar[str] = "apptainer"

    @property
    def sif(self) -> str:
        """The image file: a local ``.sif`` as given, else a pull beside the workspace
        (kept between sessions, like a pulled docker image)."""
        if _is_local_sif(self.image):
            return self.image
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", self.image)[:60]
        digest = hashlib.sha1(self.image.encode(), usedforsecurity=False).hexdigest()[:10]
        return posixpath.join(posixpath.dirname(self.workspace), ".images", f"{slug}-{digest}.sif")

    def has_image(self) -> str:
        return shlex.join(["test", "-f", self.sif])

    def pull(self) -> str | None:
        if _is_local_sif(self.image):
            return None
        uri = self.image if "://" in self.image else f"docker://{self.image}"
        make_dir = shlex.join(["mkdir", "-p", posixpath.dirname(self.sif)])
        return f"{make_dir} && {shlex.join(['apptainer', 'pull', '--force', self.sif, uri])}"

    def wrap(self, command: str) -> str:
        ws = self.workspace
        return shlex.join(
            ["apptainer", "exec", "--nv", "--bind", ws, "--pwd", ws, self.sif, "sh", "-c", command]
        )


_BY_NAME: dict[str, type[Runtime]] = {cls.name: cls for cls in (Runtime, Docker, Podman, Apptainer)}


def runtime_for(name: str, *, image: str, workspace: str, container: str) -> Runtime:
    """The runtime called ``name`` (one of :data:`RUNTIMES`) for one machine."""
    return _BY_NAME[name](image=image, workspace=workspace, container=container)


def _is_local_sif(image: str) -> bool:
    return image.endswith(".sif") and "://" not in image
