"""Per-test overhead of ``--gpu-provider local`` on a machine with a real GPU (issue 7).

Not part of ``make bench``: it needs ``nvidia-smi`` and a GPU, which the machine that runs
the benchmarks has not. docs/gpu-check.sh runs it as the last step of the GPU check
(docs/gpu-check.md).

The same trivial tests (``@pytest.mark.gpu()``, any GPU) run twice per size, each in a
pytest process of its own: with ``--gpu-cloud --gpu-provider local`` (this machine's GPU,
the worker a subprocess with ``CUDA_VISIBLE_DEVICES`` of its slot), and by plain pytest with
the plugin off. The span is the one of overhead.py (the end of the first test to the end
of the last); the overhead per test is ``(remote span - local span) / (tests - 1)``.
Session start (sync, worker start, collection) is shown apart, as the wall time of the
whole run less the local run's.

Run: ``python bench/local_gpu.py``.
"""

from __future__ import annotations

import os
import tempfile
import textwrap
from pathlib import Path
from typing import Any

from overhead import CONFTEST, INI, SCALE_TARGET_MS, Session, per_test_ms

SIZES = (200, 2_000)
NOTES: list[str] = []


def make_project(root: Path) -> None:
    """One file of trivial tests per size, each marked for any GPU."""
    (root / "pytest.ini").write_text(INI)
    (root / "conftest.py").write_text(CONFTEST)
    for size in SIZES:
        (root / f"test_n{size}.py").write_text(
            textwrap.dedent(f"""\
            import pytest


            @pytest.mark.gpu()
            @pytest.mark.parametrize("i", range({size}))
            def test_t(i):
                pass
            """)
        )


def main() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gpucloud-local-gpu-") as scratch:
        root = Path(scratch)
        make_project(root)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUCLOUD_")}
        session = Session(root, env)
        for size in SIZES:
            local = session.run(["-p", "no:gpucloud", f"test_n{size}.py"])
            remote = session.run(["--gpu-cloud", "--gpu-provider", "local", f"test_n{size}.py"])
            assert remote["tests"] == local["tests"] == size, (remote["tests"], local["tests"])
            remote_ms = per_test_ms(remote)
            local_ms = per_test_ms(local)
            overhead = remote_ms - local_ms
            start = remote["wall"] - remote["span"] - (local["wall"] - local["span"])
            print(
                f"local_gpu: {size:>5,} tests: remote {remote_ms:.3f} ms/test, plain pytest "
                f"{local_ms:.3f} ms/test, overhead {overhead:.3f} ms/test; session start "
                f"+{start:.2f} s; wall remote {remote['wall']:.2f} s, plain {local['wall']:.2f} s",
                flush=True,
            )
            rows.append(
                {
                    "name": f"per-test overhead, --gpu-provider local on this machine's GPU, "
                    f"{size:,} trivial tests (value: remote ms/test; baseline: plain pytest)",
                    "value": round(remote_ms, 3),
                    "baseline": round(local_ms, 3),
                    "ratio": round(remote_ms / local_ms, 2),
                    "target": f"overhead {overhead:.2f} ms <= {SCALE_TARGET_MS:g} ms",
                    "ok": overhead <= SCALE_TARGET_MS,
                    "unit": "ms",
                }
            )
            NOTES.append(
                f"{size:,} tests: whole run {remote['wall']:.2f} s with --gpu-cloud against "
                f"{local['wall']:.2f} s plain; session start (sync, worker start, collection) "
                f"adds {start:.2f} s."
            )
    return rows


if __name__ == "__main__":
    main()
    print("\n".join(NOTES))
