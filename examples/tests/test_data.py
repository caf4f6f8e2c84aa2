"""CPU tests: they run locally, as always."""

import numpy as np
from tinymodel import make_data


def test_data_shapes():
    x, y, w = make_data(n=32, features=3)
    assert x.shape == (32, 3)
    assert y.shape == (32,)
    assert w.shape == (3,)


def test_data_is_reproducible():
    a, _, _ = make_data(seed=1)
    b, _, _ = make_data(seed=1)
    assert np.array_equal(a, b)
