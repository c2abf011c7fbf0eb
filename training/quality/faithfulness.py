"""Is the map faithful? The deletion test (Petsiuk et al., 2018), on the held-out test split.

For each image, the pixels are ranked by the served map (``model.onnx``'s ``cam`` output,
upsampled onto the input as the service draws it), hottest first, and deleted (set to black) in
that order; the probability of the class the model first predicted is read after each step. The
same is done in random orders. A faithful map removes the evidence first, so the probability
falls sooner:

- at 20% deleted, the map's order must lower it more than random deletion does (averaged over
  ``RANDOM_ORDERS`` orders) on at least ``REQUIRED_SHARE`` of the images;
- the area under the deletion curve (probability against the share deleted, 0 to 100%) is
  reported for both: the lower, the sooner the evidence went.

Random deletion is at the map's own grain: the order of a random map (independent uniform
values per cell), upsampled as the map is, so that both delete smooth regions and differ only in
where they look. Deleting scattered single pixels is another perturbation (noise, which on its own
wrecks a small image); it is reported too, as ``random pixels``, but not compared image by image.

Two broken maps are measured beside it, to show that the test can fail: the map with its cells
shuffled, and the map of the second most probable class (from the Keras model's feature map and
head, as the export computes the top class's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.core import explain
from service.core.classifier import Classifier, ModelSource, available_cpus, load_classifier
from training import artifacts
from training.config import TrainConfig
from training.data.pipelines import load_model_inputs
from training.data.prepare import prepare_data
from training.model.cam import mapped_model, scaled_to_peak

FRACTIONS = np.round(np.linspace(0.0, 1.0, 11), 2)  # 0%, 10%, ..., 100% deleted
STEP = 0.2  # the share deleted for the per-image comparison
REQUIRED_SHARE = 0.8
RANDOM_ORDERS = 2
FILL = 0  # deleted pixels become black
CHUNK = 64  # images per onnxruntime call
MAPS = ("map", "random", "random pixels", "shuffled map", "wrong-class map")


class FaithfulnessError(ValueError):
    """The test cannot be run on this artifact; the message says why."""


@dataclass
class Deletion:
    """Deletion curves of one way of ordering the pixels: ``curves[i, j]`` is the probability of
    image i's first-predicted class with ``FRACTIONS[j]`` of its pixels deleted."""

    curves: np.ndarray  # (N, len(FRACTIONS)) float64

    @property
    def aucs(self) -> np.ndarray:
        """Each image's area under its curve (trapezoids over 0..1)."""
        steps = np.diff(FRACTIONS)
        return ((self.curves[:, 1:] + self.curves[:, :-1]) / 2) @ steps

    def drops(self, fraction: float = STEP) -> np.ndarray:
        """Each image's fall in probability with ``fraction`` deleted."""
        column = int(np.argmin(np.abs(FRACTIONS - fraction)))
        return self.curves[:, 0] - self.curves[:, column]


def probabilities(classifier: Classifier, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """``softmax(logits / T)`` of ``classes`` (one per image), in float64 (a confident image's
    probability moves below float32's resolution near 1)."""
    logits = classifier.predict(images).logits.astype(np.float64)
    logits /= classifier.contract.temperature
    logits -= logits.max(axis=1, keepdims=True)
    exponentials = np.exp(logits)
    chosen = exponentials[np.arange(len(images)), classes]
    return chosen / exponentials.sum(axis=1)


def pixel_order(cam: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """The input's pixel positions (flat), hottest in the upsampled map first; equal values
    (the map's zeros) in random order."""
    heat = explain.upsample(cam, (width, height)).ravel()
    return np.lexsort((rng.random(heat.size), -heat))


def deletion_curves(
    classifier: Classifier, images: np.ndarray, classes: np.ndarray, orders: np.ndarray
) -> Deletion:
    """Delete each image's pixels in its ``orders`` row, ``FRACTIONS`` at a time.

    Args:
        images: ``(N, H, W, C)`` uint8 model inputs.
        classes: ``(N,)`` the class whose probability is followed.
        orders: ``(N, H * W)`` pixel positions in deletion order.
    """
    count, height, width, channels = images.shape
    curves = np.empty((count, len(FRACTIONS)))
    for column, fraction in enumerate(FRACTIONS):
        deleted = int(round(fraction * height * width))
        for start in range(0, count, CHUNK):
            chunk = images[start : start + CHUNK].reshape(-1, height * width, channels).copy()
            rows = np.arange(len(chunk))[:, np.newaxis]
            chunk[rows, orders[start : start + CHUNK, :deleted]] = FILL
            curves[start : start + CHUNK, column] = probabilities(
                classifier,
                chunk.reshape(-1, height, width, channels),
                classes[start : start + CHUNK],
            )
    return Deletion(curves)


def second_class_maps(model, images: np.ndarray) -> np.ndarray:
    """The map of each image's second most probable class, computed as the export computes the
    top class's (ReLU of the feature map times that class's head weights, scaled to 0-1)."""
    mapped = mapped_model(model)
    kernel = np.asarray(mapped.kernel)
    maps = []
    for start in range(0, len(images), CHUNK):
        logits, _, features = mapped.model(images[start : start + CHUNK].astype(np.float32))
        second = np.argsort(-np.asarray(logits), axis=1)[:, 1]
        raw = np.einsum("nhwd,dn->nhw", np.asarray(features), kernel[:, second])
        positive = np.maximum(raw, 0)
        maps.append(scaled_to_peak(positive))
    return np.concatenate(maps).astype(np.float32)


def shuffled(cams: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each map with its cells in a random order of their own."""
    flat = cams.reshape(len(cams), -1)
    return np.stack([row[rng.permutation(row.size)] for row in flat]).reshape(cams.shape)


def measure(
    classifier: Classifier, images: np.ndarray, wrong_class_maps: np.ndarray | None, seed: int = 0
) -> dict:
    """The deletion test of ``classifier``'s map on ``images`` (uint8 model inputs), with the
    broken maps beside it.

    Returns:
        Per way of ordering (``MAPS``): the mean deletion AUC, the mean drop at ``STEP``, and
        (maps only) the share of images whose drop beats random deletion's, and whether that
        share reaches ``REQUIRED_SHARE``.
    """
    rng = np.random.default_rng(seed)
    count, height, width, _ = images.shape
    outputs = classifier.predict(images)
    classes = outputs.logits.argmax(axis=1)
    maps = {"map": outputs.cams, "shuffled map": shuffled(outputs.cams, rng)}
    if wrong_class_maps is not None:
        maps["wrong-class map"] = wrong_class_maps
    results = {}
    shape = outputs.cams.shape[1:]
    random_runs = [
        deletion_curves(
            classifier,
            images,
            classes,
            np.stack([pixel_order(rng.random(shape), height, width, rng) for _ in range(count)]),
        )
        for _ in range(RANDOM_ORDERS)
    ]
    random = Deletion(np.mean([run.curves for run in random_runs], axis=0))
    results["random"] = summary(random)
    scattered = np.stack([rng.permutation(height * width) for _ in range(count)])
    results["random pixels"] = summary(deletion_curves(classifier, images, classes, scattered))
    for name, cams in maps.items():
        orders = np.stack([pixel_order(cam, height, width, rng) for cam in cams])
        deletion = deletion_curves(classifier, images, classes, orders)
        share = float(np.mean(deletion.drops() > random.drops()))
        results[name] = summary(deletion) | {
            "share_beating_random": round(share, 4),
            "passed": share >= REQUIRED_SHARE,
        }
    return {
        "images": int(count),
        "deleted_at_step": STEP,
        "required_share": REQUIRED_SHARE,
        "random_orders": RANDOM_ORDERS,
        "fill": "black",
        "fractions": FRACTIONS.tolist(),
        "results": results,
        "passed": results["map"]["passed"],
    }


def summary(deletion: Deletion) -> dict:
    return {
        "deletion_auc": round(float(deletion.aucs.mean()), 4),
        "mean_drop_at_step": round(float(deletion.drops().mean()), 4),
        "mean_curve": np.round(deletion.curves.mean(axis=0), 4).tolist(),
    }


def format_table(figures: dict) -> str:
    """The figures as a Markdown table."""
    lines = [
        f"deletion test on {figures['images']} held-out test images (pixels set to black; "
        f"random: the mean of {figures['random_orders']} random maps of the map's shape)",
        "",
        f"| order of deletion | deletion AUC (lower: evidence went sooner) | mean drop at "
        f"{figures['deleted_at_step']:.0%} | images where it beats random at "
        f"{figures['deleted_at_step']:.0%} |",
        "| --- | --- | --- | --- |",
    ]
    for name in MAPS:
        if name not in figures["results"]:
            continue
        row = figures["results"][name]
        share = row.get("share_beating_random")
        shown = "" if share is None else f"{share:.1%} ({'passes' if row['passed'] else 'fails'})"
        lines.append(
            f"| {name} | {row['deletion_auc']:.3f} | {row['mean_drop_at_step']:.3f} | {shown} |"
        )
    return "\n".join(lines)


def run_faithfulness(artifact: Path, limit: int | None = None, seed: int = 0) -> dict:
    """The deletion test of an artifact's ``model.onnx`` on its held-out test split (the first
    ``limit`` images of it, spread over the split).

    Raises:
        FaithfulnessError: the model has no map, or its data changed since it was trained.
    """
    import keras

    folder = artifacts.resolve_artifact(artifact)
    classifier = load_classifier(ModelSource(folder, str(folder)), available_cpus())
    contract = classifier.contract
    if not contract.has_cam:
        reason = contract.cam_left_out or "it was exported without one; export it again"
        raise FaithfulnessError(f"{folder}: the model has no class activation map ({reason})")
    metadata = artifacts.read_json(folder / "metadata.json")
    data = prepare_data(TrainConfig.from_dict(metadata["config"]))
    if data.images.fingerprint != contract.data_fingerprint:
        raise FaithfulnessError(
            f"the data {contract.data_source} changed since {folder} was trained, so its "
            "held-out images cannot be rebuilt"
        )
    test = data.splits.test
    if limit is not None and limit < len(test):
        test = test[np.linspace(0, len(test) - 1, limit).astype(int)]
    images = load_model_inputs(data.images, test, data.spec)
    model = keras.saving.load_model(folder / "model.keras")
    figures = measure(classifier, images, second_class_maps(model, images), seed)
    return figures | {"model": contract.tag, "test_images_in_split": int(len(data.splits.test))}
