"""A torch test on any GPU of 40 GB or more: skips cleanly where torch is not installed."""

import pytest

torch = pytest.importorskip("torch")


@pytest.mark.gpu("40GB+")
def test_matmul_on_the_device():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.ones(64, 64, device=device)
    assert float((a @ a).sum()) == 64 * 64 * 64
