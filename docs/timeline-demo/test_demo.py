"""The session drawn in docs/timeline.png: local tests, and gpu tests on four instances.

pytest -n 4 -p no:randomly --gpu-cloud --gpu-provider sim --gpu-sim-boot-delay 2 \
    --gpu-start eager --gpu-timeline timeline.svg
"""

import time

import pytest


@pytest.mark.parametrize("step", range(16))
def test_preprocessing(step: int) -> None:
    time.sleep(0.25)


@pytest.mark.gpu("T4")
@pytest.mark.parametrize("batch", range(16))
def test_inference(batch: int) -> None:
    time.sleep(0.3 + 0.15 * (batch % 4))
    assert batch != 9, "loss diverged"


@pytest.mark.gpu("T4")
def test_export() -> None:
    pytest.skip("no exporter on this image")
