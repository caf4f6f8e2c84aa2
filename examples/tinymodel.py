"""A tiny linear model trained with gradient descent: the stand-in for a real training job."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class LinearModel:
    weights: np.ndarray
    bias: float = 0.0

    @classmethod
    def zeros(cls, features: int) -> LinearModel:
        return cls(np.zeros(features))

    def predict(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weights + self.bias

    def fit(
        self, x: np.ndarray, y: np.ndarray, *, steps: int = 500, lr: float = 0.1
    ) -> list[float]:
        losses = []
        for _ in range(steps):
            error = self.predict(x) - y
            self.weights -= lr * (x.T @ error) / len(y)
            self.bias -= lr * float(error.mean())
            losses.append(float((error**2).mean()))
        return losses


def make_data(n: int = 256, features: int = 4, noise: float = 0.01, seed: int = 0):
    rng = np.random.default_rng(seed)
    true_w = rng.normal(size=features)
    x = rng.normal(size=(n, features))
    y = x @ true_w + 0.5 + noise * rng.normal(size=n)
    return x, y, true_w


def mse(model: LinearModel, x: np.ndarray, y: np.ndarray) -> float:
    return float(((model.predict(x) - y) ** 2).mean())
