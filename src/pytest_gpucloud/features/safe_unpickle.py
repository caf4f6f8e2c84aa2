"""Unpickling what an instance sends, through an allow-list (as ``torch.load(weights_only=True)``).

A pinned host key proves only that we reached the machine the API named, not that it is
honest: a pickle may name any callable (``os.system``) and have it called here. So a value
from ``call()`` may name only these globals: builtin scalars, containers and exceptions,
numpy arrays, dtypes and scalars, and what the user allows (``call(fn, allow=[MyData])``,
the ini key ``gpu_cloud_unpickle_allow``). ``trusted=True`` lifts the list for one call.
"""

from __future__ import annotations

import builtins
import io
import pickle
from collections.abc import Iterable
from typing import Any

from pytest_gpucloud.core.errors import GpuCloudError

_BUILTIN_VALUES = (
    "bool bytearray bytes complex dict float frozenset int list range set slice str tuple Ellipsis"
)
_OTHERS = (
    "collections.OrderedDict collections.deque datetime.datetime datetime.date "
    "datetime.timedelta datetime.timezone decimal.Decimal fractions.Fraction numpy.ndarray "
    "numpy.dtype"
)
_NUMPY_CORE = ("numpy.core", "numpy._core")
ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {("builtins", name) for name in _BUILTIN_VALUES.split()}
    | {(name.rpartition(".")[0], name.rpartition(".")[2]) for name in _OTHERS.split()}
    | {
        (f"{core}.{module}", name)
        for core in _NUMPY_CORE
        for module, name in (
            ("multiarray", "_reconstruct"),
            ("multiarray", "scalar"),
            ("numeric", "_frombuffer"),
        )
    }
)


class DisallowedGlobal(GpuCloudError):
    """A pickle from an instance names a global outside the allow-list."""

    def __init__(self, global_name: str, instance_id: str) -> None:
        super().__init__(
            f"instance {instance_id} sent a value that names {global_name}, which is not "
            "allowed to be unpickled here: allow it with call(..., allow=[...]) or the ini "
            f"key gpu_cloud_unpickle_allow = {global_name}, or pass call(..., trusted=True) "
            "if you trust the instance to run code on this machine"
        )
        self.global_name = global_name


def allowed_names(values: Iterable[Any]) -> frozenset[tuple[str, str]]:
    """``(module, qualname)`` of classes, or of ``"module.Name"`` / ``"module.*"`` strings."""
    names = set()
    for value in values:
        if isinstance(value, str):
            module, _, name = value.strip().rpartition(".")
            if not module or not name:
                raise ValueError(f"{value!r} is not a global name such as package.module.Class")
            names.add((module, name))
        else:
            names.add((value.__module__, value.__qualname__))
    return frozenset(names)


def safe_loads(
    data: bytes,
    instance_id: str,
    *,
    allow: frozenset[tuple[str, str]] = frozenset(),
    trusted: bool = False,
) -> Any:
    """The value pickled in ``data``; :class:`DisallowedGlobal` for a global not allowed."""
    if trusted:
        return pickle.loads(data)  # the caller said so
    return _Restricted(io.BytesIO(data), instance_id, ALLOWED | allow).load()


class _Restricted(pickle.Unpickler):
    def __init__(
        self, file: io.BytesIO, instance_id: str, allowed: frozenset[tuple[str, str]]
    ) -> None:
        super().__init__(file)
        self._instance_id = instance_id
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        if (
            (module, name) in self._allowed
            or (module, "*") in self._allowed
            or (module == "builtins" and _is_builtin_exception(name))
        ):
            return super().find_class(module, name)
        raise DisallowedGlobal(f"{module}.{name}", self._instance_id)


def _is_builtin_exception(name: str) -> bool:
    value = getattr(builtins, name, None)
    return isinstance(value, type) and issubclass(value, BaseException)
