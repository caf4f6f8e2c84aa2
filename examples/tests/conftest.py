import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinymodel import LinearModel, make_data


@pytest.fixture(scope="module")
def dataset():
    return make_data()


@pytest.fixture(scope="module")
def trained(dataset):
    x, y, _ = dataset
    model = LinearModel.zeros(x.shape[1])
    model.fit(x, y)
    return model
