"""``python -m benchmarks.drift``: do the service's drift checks see planted shifts, how often
do they cry wolf, and how far are the label-free accuracy estimates from the truth?

Held-out images (the model's test split, rebuilt from its run's config, or ``--data``: a folder
of class folders named as the model's classes) are shifted, classified once by the exported
model in onnxruntime, and windows of each size are drawn from them (at random, with
replacement, so that each window is i.i.d. draws of the shifted distribution, however small the
pool), ``--windows`` per shift and size. Each window goes through
the service's own check (:func:`service.core.drift.check_window`) against the reference shipped
with the model. Per shift and window size: the detection rate (the false-alarm rate for "none"),
each test family's, the true accuracy of the model on the shifted images, and each estimator's
mean absolute error against the accuracy of the window's own images.

The shifts: brightness down 30%; Gaussian blur (radius 1); JPEG quality 10; Gaussian noise
(sigma 25 of 255); rotation by 20 degrees; a class-prior shift (3 classes drawn 3x as often);
20% of the inputs from another data set (real handwritten digits); no shift at all.

Also the cost: one check of a window of 1,000 (median of 30), and with ``--serve-rounds`` the
``/classify`` p50 at 8 connections with drift checks on (``DRIFT_WINDOW=200``) and off, in
interleaved rounds under wrk.

    python -m benchmarks.drift --model artifacts/animals/latest --png sample.png
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from service.core.classifier import ModelSource, load_classifier
from service.core.drift import ATC, MEAN_CONFIDENCE, TESTS, check_window
from service.core.postprocessing import calibrated_predictions

ROOT = Path(__file__).resolve().parents[1]
SIZES = (50, 100, 200, 500, 1000)
SHIFTS = ("none", "brightness", "blur", "jpeg10", "noise", "rotate20", "prior", "mixin20")
PRIOR_CLASSES, PRIOR_FACTOR, MIX_SHARE = 3, 3.0, 0.2
CONNECTIONS = 8


def _pillow_each(images: np.ndarray, change) -> np.ndarray:
    out = np.empty_like(images)
    for position, pixels in enumerate(images):
        squeezed = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
        changed = np.asarray(change(Image.fromarray(squeezed)), dtype=np.uint8)
        out[position] = changed.reshape(pixels.shape)
    return out


def _jpeg(image: Image.Image, quality: int = 10) -> Image.Image:
    stream = io.BytesIO()
    image.save(stream, "JPEG", quality=quality)
    stream.seek(0)
    return Image.open(stream).convert(image.mode)


def shifted(name: str, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The held-out images ``(N, H, W, C)`` uint8 with shift ``name`` applied to each."""
    if name == "brightness":
        return np.round(images * 0.7).astype(np.uint8)
    if name == "blur":
        return _pillow_each(images, lambda image: image.filter(ImageFilter.GaussianBlur(1)))
    if name == "jpeg10":
        return _pillow_each(images, _jpeg)
    if name == "noise":
        noisy = images.astype(np.float32) + rng.normal(0, 25, images.shape)
        return np.clip(np.round(noisy), 0, 255).astype(np.uint8)
    if name == "rotate20":
        return _pillow_each(images, lambda image: image.rotate(20, resample=Image.BILINEAR))
    return images


def foreign_images(spec, count: int) -> np.ndarray:
    """Images of another data set at the model's input: OpenCV's real handwritten digits when
    installed, else scikit-learn's."""
    from training.quality.outliers import _digits, _real_digits

    images = _real_digits(spec, count)
    return images if images is not None else _digits(spec, count)


def held_out(model: Path, data: str | None):
    """``(images (N, H, W, C) uint8, labels (N,), spec)`` of the held-out images."""
    from training.config import TrainConfig
    from training.data.pipelines import load_model_inputs
    from training.data.prepare import prepare_data

    metadata = json.loads((model / "metadata.json").read_text())
    config = TrainConfig.from_dict(metadata["config"])
    if data:
        config = TrainConfig.from_dict({**metadata["config"], "data": data})
    prepared = prepare_data(config)
    labels_of = {name: index for index, name in enumerate(metadata["labels"])}
    indices = prepared.splits.test if not data else np.arange(len(prepared.labels))
    images = load_model_inputs(prepared.images, indices, prepared.spec)
    labels = np.array([labels_of[prepared.class_names[k]] for k in prepared.labels[indices]])
    return images, labels, prepared.spec


def outputs(classifier, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    probabilities, ood = [], []
    for start in range(0, len(images), 256):
        batch = classifier.predict(images[start : start + 256])
        predictions = calibrated_predictions(batch.logits, batch.ood_scores, classifier.contract)
        probabilities.append(predictions.probabilities)
        if predictions.ood_scores is not None:
            ood.append(predictions.ood_scores)
    return np.concatenate(probabilities), np.concatenate(ood) if ood else None


def measure_detection(model: Path, data: str | None, windows: int, sizes, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    classifier = load_classifier(ModelSource(model, str(model)))
    if classifier.drift is None:
        raise SystemExit(f"error: {model}: {classifier.drift_unavailable}")
    reference = classifier.drift
    images, labels, spec = held_out(model, data)
    foreign = foreign_images(spec, len(images))
    clean_scores, clean_ood = outputs(classifier, images)
    results: dict = {"held_out_images": len(images), "reference_images": reference.size}
    rows = {}
    for name in SHIFTS:
        pool_images = shifted(name, images, rng)
        scores, ood = (clean_scores, clean_ood) if name in ("none", "prior", "mixin20") else (
            outputs(classifier, pool_images)
        )  # fmt: skip
        correct = scores.argmax(axis=1) == labels
        weights = np.ones(len(images))
        if name == "prior":
            boosted = rng.choice(reference.num_classes, PRIOR_CLASSES, replace=False)
            weights = np.where(np.isin(labels, boosted), PRIOR_FACTOR, 1.0)
        weights /= weights.sum()
        if name == "mixin20":
            foreign_scores, foreign_ood = outputs(classifier, foreign)
        accuracy = float(np.sum(weights * correct))
        if name == "mixin20":
            accuracy *= 1 - MIX_SHARE  # a foreign image has no right answer
        rows[name] = {"accuracy": round(accuracy, 4), "sizes": {}}
        for size in sizes:
            fired = {test: 0 for test in TESTS}
            drifted, errors = 0, {ATC: [], MEAN_CONFIDENCE: []}
            for _ in range(windows):
                chosen = rng.choice(len(images), size, p=weights)  # i.i.d. draws of the shift
                window, window_ood, right = scores[chosen], ood[chosen], correct[chosen]
                if name == "mixin20":
                    mixed = rng.random(size) < MIX_SHARE
                    others = rng.choice(len(foreign), int(mixed.sum()))
                    window, window_ood = window.copy(), window_ood.copy()
                    window[mixed], window_ood[mixed] = foreign_scores[others], foreign_ood[others]
                    right = right & ~mixed
                result = check_window(reference, window, window_ood)
                drifted += result.drifted
                for test in result.tests_fired():
                    fired[test] += 1
                for method in errors:
                    errors[method].append(abs(result.estimates[method] - right.mean()))
            rows[name]["sizes"][str(size)] = {
                "detection_rate": round(drifted / windows, 3),
                "by_test": {test: round(count / windows, 3) for test, count in fired.items()},
                "abs_error": {m: round(float(np.mean(e)), 4) for m, e in errors.items()},
            }
    results["shifts"] = rows
    results["check_ms_window_1000"] = check_cost(reference, clean_scores, clean_ood, rng)
    return results


def check_cost(reference, scores, ood, rng, size: int = 1000, repeats: int = 30) -> float:
    chosen = rng.choice(len(scores), size, replace=size > len(scores))
    window, window_ood = scores[chosen], ood[chosen]
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        check_window(reference, window, window_ood)
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 2)


def measure_log_window(size: int = 1000, rows: int = 20_000, repeats: int = 20) -> dict:
    """What a window over all replicas would cost instead: reading the last ``size`` rows of a
    real PostgreSQL prediction log holding ``rows`` (median ms of ``repeats``)."""
    import sqlalchemy

    from benchmarks.postgres import Postgres
    from service.store.database import create_engine, database_url, migrate
    from service.store.schema import predictions

    database = Postgres()
    try:
        engine = create_engine(database_url(database.new_database(), Path(".")))
        migrate(engine)
        now = time.time()
        with engine.begin() as connection:
            connection.execute(
                predictions.insert(),
                [
                    {
                        "request_id": f"r{row}", "at": now + row / 1000, "endpoint": "classify",
                        "model_name": "m", "model_version": "v",
                        "top_k": [{"label": "cat", "score": 0.9}, {"label": "dog", "score": 0.1}],
                        "predicted": "cat", "verdict": "cat", "score": 0.9, "ood_score": 0.5,
                        "input_digest": "0" * 32, "input_bytes": 100, "captured": False,
                        "capture_reason": None, "latency_ms": 1.0,
                    }
                    for row in range(rows)
                ],
            )  # fmt: skip
        query = (
            sqlalchemy.select(predictions.c.top_k, predictions.c.ood_score, predictions.c.predicted)
            .order_by(predictions.c.at.desc())
            .limit(size)
        )
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            with engine.connect() as connection:
                fetched = connection.execute(query).all()
            times.append((time.perf_counter() - started) * 1000)
        engine.dispose()
        return {"rows_read": len(fetched), "read_ms": round(statistics.median(times), 2)}
    finally:
        database.close()


def measure_serving(model: Path, png: bytes, seconds: float, rounds: int) -> dict:
    """``/classify`` at 8 connections, drift checks off and on, in interleaved rounds."""
    from benchmarks.servers import scrape, server, total
    from benchmarks.wrk import multipart_body, run_wrk

    body, content_type = multipart_body("image", "a.png", "image/png", png)
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    checked = []
    for _ in range(rounds):
        for setting in runs:
            env = {"BATCHING": "off", "DRIFT_WINDOW": "200" if setting == "on" else "0"}
            with server("service.service:ImageClassifier", model, **env) as (url, _, pid):
                runs[setting].append(
                    run_wrk(f"{url}/classify", body, content_type, CONNECTIONS, seconds, pid)
                )
                if setting == "on":
                    checked.append(total(scrape(url), "classifier_drift_windows_total"))
    figures = {
        setting: {
            "p50_ms": statistics.median(r["p50_ms"] for r in results),
            "p50_ms_rounds": [r["p50_ms"] for r in results],
            "images_per_second": statistics.median(r["images_per_second"] for r in results),
        }
        for setting, results in runs.items()
    }
    figures["on"]["windows_checked_rounds"] = checked
    ratio = figures["on"]["p50_ms"] / figures["off"]["p50_ms"]
    return {"settings": figures, "ratios": {"drift_p50_vs_off_c8": round(ratio, 3)}}


def table(results: dict) -> str:
    """The Markdown table of detection rates and estimator errors (BENCHMARKS.md)."""
    sizes = list(next(iter(results["shifts"].values()))["sizes"])
    lines = [
        "| shift | accuracy | " + " | ".join(f"n={s}" for s in sizes) + " | ATC err (n=200) | "
        "mean-conf err (n=200) |",
        "|---|---|" + "---|" * len(sizes) + "---|---|",
    ]
    for name, row in results["shifts"].items():
        rates = " | ".join(f"{row['sizes'][s]['detection_rate']:.2f}" for s in sizes)
        at = row["sizes"].get("200", row["sizes"][sizes[-1]])["abs_error"]
        lines.append(
            f"| {name} | {row['accuracy']:.3f} | {rates} | {at[ATC]:.3f} | "
            f"{at[MEAN_CONFIDENCE]:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "artifacts" / "animals" / "latest")
    parser.add_argument(
        "--data", default=None, help="held-out images to shift (default: test split)"
    )
    parser.add_argument("--windows", type=int, default=200, help="windows per shift and size")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--png", type=Path, help="the PNG /classify gets in the serving rounds")
    parser.add_argument("--serve-rounds", type=int, default=0, help="0: no serving rounds")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--output", type=Path, help="also write the figures to this JSON file")
    parser.add_argument(
        "--log-window", action="store_true", help="also time a window read from PostgreSQL"
    )
    args = parser.parse_args(argv)
    if not (args.model / "model.onnx").is_file():
        print(f"error: {args.model} has no model.onnx: run 'make train' first", file=sys.stderr)
        return 2
    sizes = tuple(int(size) for size in args.sizes.split(","))
    results = measure_detection(args.model.resolve(), args.data, args.windows, sizes, args.seed)
    if args.serve_rounds:
        if args.png is None:
            print("error: --serve-rounds needs --png (the image to send)", file=sys.stderr)
            return 2
        results["serving"] = measure_serving(
            args.model.resolve(), args.png.read_bytes(), args.seconds, args.serve_rounds
        )
    if args.log_window:
        results["log_window_1000"] = measure_log_window()
    print(json.dumps(results, indent=2))
    print(table(results))
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
