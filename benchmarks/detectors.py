"""``python -m benchmarks.detectors --artifact artifacts/animals/latest``: the unknown-input
scores compared on one trained model, and what each costs inside ``model.onnx``.

Every method is fitted on the training split's images only and its threshold set on the
validation split exactly as the job sets it (``training.quality.detector.threshold_for``: 95%
acceptance with 90% confidence); the outlier sets, real handwritten digits included, are only
ever scored. For each: the share of the test split flagged, and per outlier set the share flagged
and the AUROC
against the test split. Then onnxruntime's batch-1 latency of the exported graph with no score,
with the Mahalanobis score alone (the previous detector) and with the job's detector, measured
in interleaved rounds (median and spread).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

RESULTS = Path("benchmarks/results/detectors.json")
ROUNDS = 5
CALLS_PER_ROUND = 300


def pooled_features(model, inputs: np.ndarray, batch: int = 256) -> list[np.ndarray]:
    """``[logits, then each ReLU's output averaged over space, ..., the penultimate layer]``."""
    import keras

    from service.core.contract import OUTPUT_NAME

    relus = [layer.name for layer in model.layers if "relu" in layer.name]
    outputs = [model.output] + [model.get_layer(name).output for name in relus]
    outputs.append(model.get_layer(OUTPUT_NAME).input)
    extractor = keras.Model(model.input, outputs)
    parts = None
    for start in range(0, len(inputs), batch):
        values = extractor(inputs[start : start + batch].astype(np.float32), training=False)
        values = [np.asarray(value) for value in values]
        values = [value.mean(axis=(1, 2)) if value.ndim == 4 else value for value in values]
        if parts is None:
            parts = [[value] for value in values]
        else:
            for part, value in zip(parts, values, strict=True):
                part.append(value)
    return [np.concatenate(part) for part in parts]


def energy(logits: np.ndarray) -> np.ndarray:
    """The energy score, ``-logsumexp(logits)``: higher for unknown inputs (Liu et al., 2020)."""
    from scipy.special import logsumexp

    return -logsumexp(np.asarray(logits, dtype=np.float64), axis=1)


def methods(train: list, train_labels: np.ndarray, chosen, num_classes: int, seed: int) -> dict:
    """name -> function of ``(pooled features, the job's detector features)``, each fitted on
    the training split's features (``chosen``: the job's detector, fitted so)."""
    from training.quality.detector import fit_detector, fit_mahalanobis

    penultimate = fit_mahalanobis(train[-1], train_labels, num_classes)
    layers = [fit_mahalanobis(part, train_labels, num_classes) for part in train[1:]]
    knn = fit_detector(train[-1], train_labels, num_classes, seed=seed)
    # Feature ensemble (Lee et al., 2018) without outlier data to weigh the layers: each
    # layer's distance over its training mean and spread, summed.
    spreads = []
    for detector, part in zip(layers, train[1:], strict=True):
        scores = detector.mahalanobis(part)
        spreads.append((scores.mean(), scores.std()))

    def ensemble(parts, _):
        return sum(
            (detector.mahalanobis(part) - mean) / spread
            for detector, part, (mean, spread) in zip(layers, parts[1:], spreads, strict=True)
        )

    def softmax_score(parts, _):
        from service.core.postprocessing import softmax

        return -softmax(parts[0]).max(axis=1)

    return {
        "top-1 softmax (for comparison)": softmax_score,
        "energy": lambda parts, _: energy(parts[0]),
        "Mahalanobis, penultimate layer (the previous detector)": lambda parts, _: (
            penultimate.mahalanobis(parts[-1])
        ),
        "Mahalanobis feature ensemble, every ReLU and the penultimate layer": ensemble,
        "k-nearest neighbours, normalised penultimate layer": lambda parts, _: knn.scores(
            parts[-1]
        ),
        "k-nearest neighbours at every block, mean (the job's detector)": lambda _, job: (
            chosen.scores(job)
        ),
    }


def compare(artifact: Path) -> dict:
    import keras

    from training import artifacts
    from training.config import TrainConfig
    from training.data.pipelines import load_model_inputs
    from training.data.prepare import prepare_data
    from training.model.cnn import block_outputs, detector_model, detector_widths, embed_arrays
    from training.quality.detector import fit_detector, threshold_for
    from training.quality.outliers import outlier_sets

    folder = artifacts.resolve_artifact(artifact)
    metadata = artifacts.read_json(folder / "metadata.json")
    config = TrainConfig.from_dict(metadata["config"])
    data = prepare_data(config)
    model = keras.saving.load_model(folder / "model.keras")
    splits = data.splits
    inputs = {
        name: load_model_inputs(data.images, getattr(splits, name), data.spec)
        for name in ("train", "validation", "test")
    }
    job = detector_model(model)
    features = {name: pooled_features(model, images) for name, images in inputs.items()}
    detector_features = {name: embed_arrays(job, images)[1] for name, images in inputs.items()}
    sets = outlier_sets(data.spec, inputs["test"], config.seed)
    outliers = {name: pooled_features(model, images) for name, images in sets.items()}
    outlier_features = {name: embed_arrays(job, images)[1] for name, images in sets.items()}
    train_labels = data.labels[splits.train]
    chosen = fit_detector(
        detector_features["train"],
        train_labels,
        data.num_classes,
        detector_widths(model),
        config.seed,
        mahalanobis=not block_outputs(model),
    )
    chosen.threshold = threshold_for(
        chosen.scores(detector_features["validation"]), config.ood_acceptance
    )
    scorers = methods(features["train"], train_labels, chosen, data.num_classes, config.seed)
    from sklearn.metrics import roc_auc_score

    rows = {}
    for method, score in scorers.items():
        threshold = threshold_for(
            score(features["validation"], detector_features["validation"]),
            config.ood_acceptance,
        )
        test = score(features["test"], detector_features["test"])
        row = {"test_flagged": round(float(np.mean(test > threshold)), 4), "sets": {}}
        for name, parts in outliers.items():
            values = score(parts, outlier_features[name])
            truth = np.r_[np.zeros(len(test)), np.ones(len(values))]
            row["sets"][name] = {
                "flagged": round(float(np.mean(values > threshold)), 4),
                "auroc": round(float(roc_auc_score(truth, np.r_[test, values])), 4),
            }
        rows[method] = row
        print(method, json.dumps(row), flush=True)
    return {
        "artifact": metadata["version"],
        "test_accuracy": metadata["metrics"]["test_accuracy"],
        "methods": rows,
        "latency": latency(model, data, metadata, chosen),
    }


def latency(model, data, metadata: dict, detector) -> dict:
    """onnxruntime batch-1 latency (one thread, as the int8 gate times it) of the graph with no
    score, the Mahalanobis score alone and the job's detector, in interleaved rounds."""
    import dataclasses

    from service.core.contract import ModelContract
    from service.core.timing import median_seconds
    from training.data.pipelines import load_model_inputs
    from training.export.convert import convert_to_onnx
    from training.export.quantize import one_thread_session

    contract = ModelContract.from_metadata(metadata)
    from training.model.cnn import detector_model, embed_arrays
    from training.quality.detector import fit_mahalanobis

    # The previous detector: the Mahalanobis distance of the penultimate layer alone.
    train = load_model_inputs(data.images, data.splits.train, data.spec)
    features = embed_arrays(detector_model(model), train)[1][:, -detector.widths[-1] :]
    mahalanobis = fit_mahalanobis(features, data.labels[data.splits.train], data.num_classes)
    mahalanobis.threshold = 1.0
    variants = {
        "no score": convert_to_onnx(model, dataclasses.replace(contract, ood_output_name="")),
        "Mahalanobis alone": convert_to_onnx(model, contract, mahalanobis),
        "the job's detector": convert_to_onnx(model, contract, detector),
    }
    image = load_model_inputs(data.images, data.splits.test[:1], data.spec).astype(np.float32)
    sessions = {name: one_thread_session(proto) for name, proto in variants.items()}
    timings: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(ROUNDS):
        for name, session in sessions.items():
            seconds = median_seconds(
                lambda s=session: s.run(None, {contract.input_name: image}), CALLS_PER_ROUND
            )
            timings[name].append(seconds * 1e6)
    return {
        name: {
            "median_us": round(float(np.median(values)), 1),
            "min_us": round(min(values), 1),
            "max_us": round(max(values), 1),
            "model_bytes": len(variants[name].SerializeToString()),
        }
        for name, values in timings.items()
    }


def tables(result: dict) -> str:
    methods_ = result["methods"]
    names = list(next(iter(methods_.values()))["sets"])
    lines = [
        "| method | test split flagged | " + " | ".join(names) + " |",
        "| --- | --- | " + " | ".join("---" for _ in names) + " |",
    ]
    for method, row in methods_.items():
        cells = [
            f"{row['sets'][name]['flagged']:.1%} / {row['sets'][name]['auroc']:.3f}"
            for name in names
        ]
        lines.append(f"| {method} | {row['test_flagged']:.1%} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| graph | onnxruntime batch 1, one thread (median, range of 5 rounds) | model.onnx |",
        "| --- | --- | --- |",
    ]
    for name, figures in result["latency"].items():
        lines.append(
            f"| {name} | {figures['median_us']} us ({figures['min_us']}-{figures['max_us']}) "
            f"| {figures['model_bytes'] / 1e6:.2f} MB |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.detectors", description=__doc__)
    parser.add_argument("--artifact", type=Path, default=Path("artifacts/animals/latest"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    result = compare(args.artifact)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(tables(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
