"""What GPUs a machine shows: nvidia-smi's answers, type names, and the health check.

Before its first test, a machine runs :data:`PROBE` inside its container runtime: the GPUs
nvidia-smi lists (only those of ``CUDA_VISIBLE_DEVICES`` where it is set) must be of the
requested type, and as many as requested. The simulated cloud has no GPU: there the probe
reads the sim's own declaration (``GPUCLOUD_SIM_GPU="<type>:<count>"``), and says so.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

SIM_ENV = "GPUCLOUD_SIM_GPU"
_SIM_MARK = "gpucloud-sim-gpu "
SMI_FORMAT = "--format=csv,noheader,nounits"
PROBE = (
    f'if [ -n "${{{SIM_ENV}:-}}" ]; then echo "{_SIM_MARK}${SIM_ENV}"; '
    f"else nvidia-smi --query-gpu=name,memory.total {SMI_FORMAT}"
    ' ${CUDA_VISIBLE_DEVICES:+-i "$CUDA_VISIBLE_DEVICES"}; fi'
)
# Words of nvidia-smi's names that say nothing about the type: the vendor, the form factor.
_NOISE = re.compile(r"NVIDIA|TESLA|SXM\d*|PCIE|HBM\d*E?|NVL", re.IGNORECASE)
_GB = re.compile(r"(\d+)GB", re.IGNORECASE)


@dataclass(frozen=True)
class SeenGpu:
    """One GPU as a machine shows it: nvidia-smi's name and memory (MiB), or the sim's type."""

    name: str
    memory_mib: int | None = None


def csv_rows(text: str) -> list[list[str]]:
    """The rows of nvidia-smi's ``--format=csv,noheader,nounits`` answer."""
    return [
        [cell.strip() for cell in line.split(",")] for line in text.splitlines() if line.strip()
    ]


def type_name(smi_name: str) -> str:
    """A catalog-style type name for nvidia-smi's name: ``NVIDIA A100-SXM4-80GB`` ->
    ``A100-80GB``, ``Tesla T4`` -> ``T4``, ``NVIDIA H100 80GB HBM3`` -> ``H100-80GB``."""
    words = [w for w in re.split(r"[\s_-]+", smi_name.strip()) if w and not _NOISE.fullmatch(w)]
    return "-".join(words) or smi_name.strip()


def is_type(gpu: SeenGpu, wanted: str) -> bool:
    """Whether ``gpu`` is of the type ``wanted`` (a catalog name such as ``A100-80GB``).

    Each dash-separated part of ``wanted`` must be a word of the GPU's name; a memory part
    (``80GB``) may instead match its memory, within 10%.
    """
    words = {w.upper() for w in type_name(gpu.name).split("-")}
    for part in wanted.upper().split("-"):
        if part in words:
            continue
        size = _GB.fullmatch(part)
        if (
            size
            and gpu.memory_mib
            and abs(gpu.memory_mib / 1024 - int(size[1])) <= 0.1 * int(size[1])
        ):
            continue
        return False
    return True


@dataclass(frozen=True)
class Sighting:
    """What the probe found. ``problem``: why no GPU could be listed (nvidia-smi missing or
    failing); ``simulated``: the GPUs are the simulated cloud's declaration."""

    gpus: tuple[SeenGpu, ...] = ()
    simulated: bool = False
    problem: str | None = None

    def has(self, wanted: str, count: int) -> bool:
        """At least ``count`` GPUs of type ``wanted``."""
        return sum(is_type(gpu, wanted) for gpu in self.gpus) >= count

    def describe(self) -> str:
        if self.problem is not None:
            return f"no GPU ({self.problem})"
        if not self.gpus:
            return "no GPU (nvidia-smi listed none)"
        counts = Counter(self.gpus)
        shown = ", ".join(f"{n} x {_gpu_text(gpu)}" for gpu, n in counts.items())
        if self.simulated:
            return f"{shown}, as the simulated cloud declares it ({SIM_ENV}; no GPU to check)"
        return shown


def read_probe(exit_status: int | None, stdout: str, stderr: str) -> Sighting:
    """The :class:`Sighting` of one run of :data:`PROBE`."""
    if stdout.startswith(_SIM_MARK):
        declared = stdout[len(_SIM_MARK) :].strip()
        name, _, count = declared.rpartition(":")
        if not name or not count.isdigit():
            return Sighting(problem=f"{SIM_ENV}={declared!r} is not TYPE:COUNT")
        return Sighting(tuple(SeenGpu(name) for _ in range(int(count))), simulated=True)
    if exit_status != 0:
        said = (stderr.strip() or stdout.strip()).splitlines()
        reason = said[-1][:200] if said else f"exit status {exit_status}"
        if exit_status == 127:
            reason = "nvidia-smi not found"
        return Sighting(problem=f"nvidia-smi: {reason}")
    gpus = []
    for row in csv_rows(stdout):
        memory = row[1] if len(row) > 1 else ""
        gpus.append(SeenGpu(row[0], int(memory) if memory.isdigit() else None))
    return Sighting(tuple(gpus))


def _gpu_text(gpu: SeenGpu) -> str:
    if gpu.memory_mib is None:
        return gpu.name
    return f"{gpu.name} ({gpu.memory_mib / 1024:.0f} GB)"
