"""``--compare-with``: the new model against the one it would replace, on the same held-out
images, with McNemar's exact test, before the new one may become ``latest``.

Both models run in onnxruntime, each through its own contract (its input size, its labels), on
the run's test split, in two sets: the images of the original data (the first ``--data``
source) and the held-out images of the others (the inputs labelled through feedback). In each
set, McNemar's test looks only at the images one model gets right and the other wrong: the new
model is refused if it is right on significantly fewer of them (one-sided exact binomial test,
5%). A label the old model does not know counts as wrong for it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.core.classifier import (
    Classifier,
    ModelSource,
    available_cpus,
    load_classifier,
    model_in_folder,
)
from service.registry.model_store import model_in_store
from training.data.pipelines import load_model_inputs
from training.data.prepare import PreparedData

SIGNIFICANCE = 0.05
SETS = {"original": "the original data's test split", "feedback": "the other sources' held-out"}


class ModelRefused(Exception):
    """The new model was found worse than the one it would replace; the message says where."""


def open_reference(reference: str) -> Classifier:
    """The model to compare with: an artifact folder, or a model-store tag.

    Raises:
        service.core.classifier.ModelLoadError: it cannot be found or loaded.
    """
    path = Path(reference)
    source = model_in_folder(path, reference) if path.is_dir() else model_in_store(reference)
    return load_classifier(source, available_cpus())


def correct(classifier: Classifier, data: PreparedData, indices: np.ndarray) -> np.ndarray:
    """(N,) bool: whether ``classifier``'s top class is each image's true class."""
    inputs = load_model_inputs(data.images, indices, classifier.spec)
    predicted = np.concatenate(
        [
            classifier.predict(inputs[start : start + 256]).logits.argmax(axis=1)
            for start in range(0, len(inputs), 256)
        ]
    )
    truth = np.asarray(data.class_names)[data.labels[indices]]
    return np.asarray(classifier.labels)[predicted] == truth


def mcnemar_worse(old_right: np.ndarray, new_right: np.ndarray) -> dict:
    """McNemar's exact one-sided test that the new model is worse: the discordant images and
    the p-value of the old model winning at least as many of them by chance."""
    from scipy.stats import binomtest

    old_only = int(np.sum(old_right & ~new_right))
    new_only = int(np.sum(new_right & ~old_right))
    discordant = old_only + new_only
    p_value = 1.0 if discordant == 0 else binomtest(old_only, discordant, 0.5, "greater").pvalue
    return {
        "images": int(len(old_right)),
        "old_accuracy": round(float(np.mean(old_right)), 4),
        "new_accuracy": round(float(np.mean(new_right)), 4),
        "old_only_right": old_only,
        "new_only_right": new_only,
        "p_value": round(float(p_value), 4),
        "worse": bool(p_value < SIGNIFICANCE),
    }


def compare_models(new_folder: Path, reference: str, data: PreparedData) -> dict:
    """Both models on each held-out set; ``accepted`` when the new one is worse on none."""
    old = open_reference(reference)
    new = load_classifier(ModelSource(new_folder, "the new model"), available_cpus())
    test = data.splits.test
    origin = data.images.origin[test]
    sets = {"original": test[origin == 0], "feedback": test[origin > 0]}
    results = {}
    for name, indices in sets.items():
        if len(indices):
            results[name] = mcnemar_worse(correct(old, data, indices), correct(new, data, indices))
    refused = [name for name, figures in results.items() if figures["worse"]]
    return {
        "old_model": {"name": old.name, "version": old.version, "source": old.source},
        "test": "McNemar's exact test, one-sided, new worse at 5%",
        "sets": results,
        "accepted": not refused,
        "worse_on": refused,
    }


def format_comparison(comparison: dict) -> str:
    """The two models side by side, a line per held-out set, and the verdict."""
    old = comparison["old_model"]
    lines = [f"compared with {old['name']} {old['version']} ({comparison['test']}):"]
    for name, figures in comparison["sets"].items():
        lines.append(
            f"  {SETS[name]} ({figures['images']} images): accuracy {figures['old_accuracy']:.4f}"
            f" -> {figures['new_accuracy']:.4f}; only the old right on "
            f"{figures['old_only_right']}, only the new on {figures['new_only_right']}, "
            f"p = {figures['p_value']:.4f}: {'worse' if figures['worse'] else 'not worse'}"
        )
    lines.append(
        "verdict: published as latest"
        if comparison["accepted"]
        else f"verdict: refused (worse on {', '.join(comparison['worse_on'])})"
    )
    return "\n".join(lines)
