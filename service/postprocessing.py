"""Scores to labels: softmax over the model's logits, then argmax and the top k."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``(N, K)`` logits, shifted by the row maximum for stability.

    Returns:
        ``(N, K)`` float32 probabilities; each row sums to 1.
    """
    logits = np.asarray(logits, dtype=np.float32)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exponentials = np.exp(shifted)
    return exponentials / exponentials.sum(axis=-1, keepdims=True)


def top_k(probabilities: np.ndarray, labels: list[str], k: int) -> list[list[dict]]:
    """The ``k`` most probable labels of each row, best first.

    Args:
        probabilities: ``(N, K)`` softmax output.
        labels: the K class names; ``labels[i]`` names output position ``i``.
        k: how many to keep, 1..K.

    Returns:
        One list per image of ``{"label": str, "score": float}``, sorted by falling score (ties
        keep the lower output position first, as argmax does).
    """
    order = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]
    return [
        [{"label": labels[position], "score": float(row[position])} for position in positions]
        for row, positions in zip(probabilities, order, strict=True)
    ]
