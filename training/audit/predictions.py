"""Out-of-fold predicted probabilities and unknown-input scores: every image is scored by a model
that never saw it, as confident learning needs.

Two ways, chosen by what is at hand:

- embeddings of a pretrained backbone (``--backbone`` with weights): the images' pooled features,
  then K-fold logistic regression (scikit-learn) on them;
- otherwise a quick model: the project's compact CNN, trained K times (each on K-1 folds, a few
  epochs, no augmentation) and applied to the fold it left out.

Each fold also fits the unknown-input detector of the training job (Mahalanobis distance to the
nearest class mean, :mod:`training.quality.detector`) on its training part and scores the part
it left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import softmax
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from service.core.preprocessing import ImageSpec
from training.model.cnn import build_loss, build_model, embed_arrays, embedding_model
from training.quality.detector import fit_mahalanobis

QUICK_BATCH = 64
QUICK_LEARNING_RATE = 2e-3
QUICK_LOSS = "categorical_crossentropy"
# Gradient steps each quick model takes at least: a few hundred images need more epochs than
# --epochs to learn anything (5 epochs of 300 images are 25 steps).
MIN_STEPS = 100


@dataclass
class OutOfFold:
    probabilities: np.ndarray  # (N, K)
    ood_scores: np.ndarray  # (N,)
    method: str
    folds: int


def fold_count(labels: np.ndarray, folds: int) -> int:
    """``folds``, lowered so that each fold holds an image of the smallest class."""
    smallest = int(np.bincount(labels).min())
    return max(2, min(folds, smallest))


def _folds(labels: np.ndarray, folds: int, seed: int):
    splitter = StratifiedKFold(fold_count(labels, folds), shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(labels)), labels))


def _ood_scores(train_features, train_labels, held_out_features, classes: int) -> np.ndarray:
    detector = fit_mahalanobis(train_features, train_labels, classes)
    return detector.scores(held_out_features)


def from_embeddings(
    features: np.ndarray, labels: np.ndarray, classes: int, folds: int, seed: int
) -> OutOfFold:
    """K-fold logistic regression on fixed embeddings ``(N, D)``."""
    probabilities = np.zeros((len(labels), classes))
    scores = np.zeros(len(labels), dtype=np.float32)
    splits = _folds(labels, folds, seed)
    for train, held_out in splits:
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300, C=0.5))
        model.fit(features[train], labels[train])
        probabilities[np.ix_(held_out, model.classes_)] = model.predict_proba(features[held_out])
        scores[held_out] = _ood_scores(features[train], labels[train], features[held_out], classes)
    method = f"logistic regression on backbone embeddings, {len(splits)}-fold"
    return OutOfFold(probabilities, scores, method, len(splits))


def _fit_quick_model(inputs, labels, spec: ImageSpec, classes: int, epochs: int, seed: int):
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    model = build_model(spec, classes)
    # Adam with the learning rate decayed to 0 (cosine): in 5 epochs the CNN reaches 94.6% on
    # the built-in set, against 88% at a constant 1e-3 (whose last epochs jump about).
    per_epoch = -(-len(labels) // QUICK_BATCH)
    epochs = max(epochs, -(-MIN_STEPS // per_epoch))
    steps = epochs * per_epoch
    schedule = keras.optimizers.schedules.CosineDecay(QUICK_LEARNING_RATE, steps)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss=build_loss(QUICK_LOSS))
    targets = keras.utils.to_categorical(labels, num_classes=classes)
    # The passes over the data, reshuffled each time, as one Keras epoch of `steps` steps: a
    # small folder needs ~100 passes of one step each, and Keras's fixed cost per epoch was most
    # of their time (BENCHMARKS.md, "The audit's quick models on a small folder").
    passes = (
        tf.data.Dataset.from_tensor_slices((inputs.astype(np.float32), targets))
        .shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
        .batch(QUICK_BATCH)
        .repeat(epochs)
    )
    model.fit(passes, steps_per_epoch=steps, epochs=1, shuffle=False, verbose=0)
    return embedding_model(model)


def from_quick_model(
    inputs: np.ndarray,
    labels: np.ndarray,
    spec: ImageSpec,
    classes: int,
    folds: int,
    epochs: int,
    seed: int,
) -> OutOfFold:
    """K-fold training of the compact CNN on model inputs ``(N, H, W, C)`` uint8."""
    probabilities = np.zeros((len(labels), classes))
    scores = np.zeros(len(labels), dtype=np.float32)
    splits = _folds(labels, folds, seed)
    for fold, (train, held_out) in enumerate(splits):
        embedder = _fit_quick_model(
            inputs[train], labels[train], spec, classes, epochs, seed + fold
        )
        _, train_features = embed_arrays(embedder, inputs[train])
        logits, features = embed_arrays(embedder, inputs[held_out])
        probabilities[held_out] = softmax(logits, axis=1)
        scores[held_out] = _ood_scores(train_features, labels[train], features, classes)
    method = f"compact CNN trained at least {epochs} epochs per fold, {len(splits)}-fold"
    return OutOfFold(probabilities, scores, method, len(splits))
