"""GPU tests: with --gpu-cloud they run on an instance; without it they are skipped."""

import pytest
from tinymodel import LinearModel, mse


@pytest.mark.gpu("T4")
def test_fit_reduces_loss(dataset):
    x, y, _ = dataset
    losses = LinearModel.zeros(x.shape[1]).fit(x, y, steps=200)
    assert losses[-1] < losses[0] / 100


@pytest.mark.gpu("T4")
def test_recovers_true_weights(trained, dataset):
    _, _, true_w = dataset
    assert abs(trained.weights - true_w).max() < 0.05


@pytest.mark.gpu("A100")
def test_evaluate(trained, dataset):
    x, y, _ = dataset
    assert mse(trained, x, y) < 1e-3
