"""Softmax and top-k: the step from logits to labels."""

import numpy as np

from service.core.postprocessing import softmax, top_k


def test_softmax_rows_sum_to_one_and_survive_huge_logits():
    probabilities = softmax(np.array([[1.0, 2.0, 3.0], [1000.0, 0.0, -1000.0]]))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)
    assert np.isfinite(probabilities).all()
    np.testing.assert_allclose(
        probabilities[0], np.exp([1, 2, 3]) / np.exp([1, 2, 3]).sum(), rtol=1e-6
    )


def test_top_k_is_sorted_best_first_and_named_by_position():
    probabilities = np.array([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25]], dtype=np.float32)
    result = top_k(probabilities, ["cat", "dog", "other"], k=2)
    assert [entry["label"] for entry in result[0]] == ["dog", "other"]
    assert [entry["label"] for entry in result[1]] == ["cat", "dog"]  # tie: lower position first
    assert result[0][0]["score"] == np.float32(0.6)
