"""Finding 1 of the hostile-instance review: a value ``call()`` brings back is unpickled
through an allow-list, so an instance cannot run code here through ``__reduce__``."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from pytest_gpucloud.features.safe_unpickle import DisallowedGlobal, allowed_names, safe_loads
from tests.cloud import GpuRun

CALLS = """
import dataclasses
import os
import pathlib

import pytest

from pytest_gpucloud.features.safe_unpickle import DisallowedGlobal

PWNED = pathlib.Path({pwned!r})


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {{PWNED}}",))


@dataclasses.dataclass
class Metrics:
    loss: float


def evil():
    return Evil()


def metrics():
    return Metrics(0.25)


class Odd(Exception):
    pass


def raises_odd():
    raise Odd("odd on the GPU")


def test_calls(gpu_cloud):
    with gpu_cloud.instance("T4") as gpu:
        with pytest.raises(DisallowedGlobal, match="names posix.system.*trusted=True"):
            gpu.call(evil)
        assert not PWNED.exists()
        with pytest.raises(DisallowedGlobal, match="test_calls.Metrics.*allow="):
            gpu.call(metrics)
        assert gpu.call(metrics, allow=[Metrics]) == Metrics(0.25)
        assert gpu.call(metrics, allow=["test_calls.*"]) == Metrics(0.25)
        with pytest.raises(Exception, match="odd on the GPU") as caught:
            gpu.call(raises_odd)
        assert "the exception itself stays there" in str(caught.value)
"""


def test_an_instance_cannot_run_code_here_through_a_pickle(
    gpu_run: GpuRun, pytester: pytest.Pytester, tmp_path: Path
) -> None:
    pwned = tmp_path / "pwned"
    pytester.makepyfile(test_calls=CALLS.format(pwned=str(pwned)))
    result = gpu_run.subprocess()
    result.assert_outcomes(passed=1)
    assert not pwned.exists()


def test_the_ini_allow_list_lets_a_class_through(
    gpu_run: GpuRun, pytester: pytest.Pytester, tmp_path: Path
) -> None:
    pytester.makeini("[pytest]\ngpu_cloud_unpickle_allow = test_ini.Metrics\n")
    pytester.makepyfile(
        test_ini="""
        import dataclasses

        @dataclasses.dataclass
        class Metrics:
            loss: float

        def test_allowed(gpu_cloud):
            with gpu_cloud.instance("T4") as gpu:
                assert gpu.call(lambda: Metrics(0.5)) == Metrics(0.5)
        """
    )
    gpu_run.subprocess().assert_outcomes(passed=1)


@pytest.mark.parametrize(
    "value",
    [
        {"a": [1, 2.5, "x", b"y", None, True, (1, 2), {3}, frozenset({4}), 1j]},
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.array(["a", "bc"]),
        np.float64(1.5),
        np.dtype("int16"),
        ValueError("builtin exceptions come back"),
    ],
    ids=repr,
)
def test_values_the_list_allows(value: object) -> None:
    for protocol in range(3, pickle.HIGHEST_PROTOCOL + 1):
        back = safe_loads(pickle.dumps(value, protocol=protocol), "i-1")
        assert type(back) is type(value)
        assert repr(back) == repr(value)


def test_a_global_outside_the_list_is_named() -> None:
    data = pickle.dumps(Path("x"))
    # pathlib on 3.10-3.12, pathlib._local on 3.13: the name as pickle wrote it.
    module = type(Path("x")).__module__
    with pytest.raises(DisallowedGlobal, match=rf"i-1 .*names {re.escape(module)}\.\w*Path"):
        safe_loads(data, "i-1")
    assert safe_loads(data, "i-1", allow=allowed_names([f"{module}.*"])) == Path("x")
    assert safe_loads(data, "i-1", trusted=True) == Path("x")
