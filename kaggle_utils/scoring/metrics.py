"""Evaluation: accuracy (the competition metric) and log loss."""

from __future__ import annotations

import numpy as np


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows whose most probable class is the label. ``probs`` (N, 2), ``labels`` (N,)."""
    return float((probs.argmax(1) == labels).mean())


def log_loss(probs: np.ndarray, labels: np.ndarray, eps: float = 1e-7) -> float:
    """Mean negative log probability of the label."""
    p = np.clip(probs[np.arange(len(labels)), labels], eps, 1.0)
    return float(-np.log(p).mean())


def evaluate(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"accuracy": accuracy(probs, labels), "log_loss": log_loss(probs, labels), "rows": int(len(labels))}
