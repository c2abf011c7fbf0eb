"""The training measurements of a benchmark run: the compact CNN's training speed, and a
MobileNetV3-Small classifier trained by the job on photos, then served and measured."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from benchmarks.explanations import measure_cam_cost, measure_explain
from benchmarks.measure import (
    measure_payload_limits,
    measure_plain_fastapi,
    measure_service,
    payload_bodies,
)
from benchmarks.servers import ROOT
from service.core.timing import median_seconds


def measure_training(max_per_class: int | None, epochs: int) -> dict:
    """Images/s of the job's tf.data pipeline against ``model.fit`` on in-memory arrays, same
    model, same images, no augmentation; epochs after the first (graph tracing) only."""
    import keras

    from training.config import TrainConfig
    from training.data.pipelines import make_dataset, preprocess_in_memory
    from training.data.prepare import prepare_data
    from training.model.cnn import build_compiled_model

    config = TrainConfig(max_per_class=max_per_class, augment=False, export=False, publish=False)
    data = prepare_data(config)
    train = data.splits.train

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds = [*getattr(self, "seconds", []), time.perf_counter() - self.started]

    def images_per_second(fit) -> float:
        keras.utils.set_random_seed(config.seed)
        model = build_compiled_model(config, data.spec, len(data.class_names))
        timer = EpochTimer()
        fit(model, timer)
        return round(len(train) / float(np.median(timer.seconds[1:])), 1)

    pipeline = images_per_second(
        lambda model, timer: model.fit(
            make_dataset(
                data.images,
                train,
                data.targets,
                data.spec,
                config.batch_size,
                training=True,
                seed=config.seed,
            ),
            epochs=epochs,
            callbacks=[timer],
            verbose=0,
            shuffle=False,
        )
    )
    pixels = preprocess_in_memory(data.images.subset(train), data.spec).astype(np.float32)
    in_memory = images_per_second(
        lambda model, timer: model.fit(
            pixels,
            data.targets[train],
            batch_size=config.batch_size,
            epochs=epochs,
            callbacks=[timer],
            verbose=0,
        )
    )
    return {
        "images": len(train),
        "pipeline_images_per_second": pipeline,
        "in_memory_fit_images_per_second": in_memory,
    }


BACKBONE = "mobilenet_v3_small"


def photo_folder(root: Path, per_class: int, seed: int = 0) -> Path:
    """Two classes of real photos: random square crops (120-400 px, JPEG) of scikit-learn's two
    sample photos, one class each."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    rng = np.random.default_rng(seed)
    for name in ("china", "flower"):
        photo = load_sample_image(f"{name}.jpg")
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            side = int(rng.integers(120, 400))
            top = int(rng.integers(0, photo.shape[0] - side))
            left = int(rng.integers(0, photo.shape[1] - side))
            crop = Image.fromarray(photo[top : top + side, left : left + side])
            crop.save(root / name / f"{index:04d}.jpg", quality=90)
    return root


def _write_stand_in_weights(folder: Path, size: int, output: Path) -> None:
    """Stand-in weights of the backbone for ``size`` inputs, with BatchNormalization statistics
    from every fifth photo of ``folder``."""
    from benchmarks.stand_in_weights import write_stand_in_weights
    from service.core.preprocessing import ImageSpec, preprocess_bytes

    spec = ImageSpec(size, size, 3)
    files = sorted(folder.rglob("*.jpg"))[::5]
    images = np.stack([preprocess_bytes(path.read_bytes(), spec) for path in files])
    write_stand_in_weights(BACKBONE, images, output)


def train_backbone(
    scratch: Path, per_class: int, image_size: int, head_epochs: int, fine_tune_epochs: int
) -> tuple:
    """Train a backbone classifier with the training job's CLI on a folder of photos, from a
    stand-in weights file (ImageNet's need the internet; speed does not depend on the values).

    Returns:
        ``(artifact folder, training figures from its metadata.json)``.
    """
    import json
    import multiprocessing
    import subprocess
    import sys
    from concurrent.futures import ProcessPoolExecutor

    folder = photo_folder(scratch / "photos", per_class)
    weights = scratch / f"{BACKBONE}.weights.h5"
    # In a fresh process of its own: TensorFlow stays out of the measuring process.
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(_write_stand_in_weights, folder, image_size, weights).result()
    subprocess.run(
        [sys.executable, "-m", "training", "--data", str(folder), "--backbone", BACKBONE,
         "--weights", str(weights), "--image-size", str(image_size), "--epochs", str(head_epochs),
         "--fine-tune-epochs", str(fine_tune_epochs), "--output", str(scratch / "artifacts"),
         "--name", "backbone", "--no-publish", "--audit", "off"],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    model = (scratch / "artifacts" / "backbone" / "latest").resolve()
    metadata = json.loads((model / "metadata.json").read_text())
    phases = metadata["training"]["phases"]
    head, fine = phases["head"], phases["fine_tune"]
    training = {
        "backbone": BACKBONE,
        "image_size": image_size,
        "train_images": metadata["data"]["splits"]["train"],
        "phase_1_feature_images": head["feature_images"],
        "phase_1_feature_seconds": head["feature_seconds"],
        "phase_1_feature_images_per_second": head["feature_images_per_second"],
        "phase_1_epochs": head["epochs"],
        "phase_1_head_fit_seconds": head["fit_seconds"],
        "phase_1_uncached_seconds_estimate": head["uncached_seconds_estimate"],
        "phase_2_epochs": fine["epochs"],
        "phase_2_fit_seconds": fine["fit_seconds"],
        "phase_2_train_images_per_second": fine["train_images_per_second"],
    }
    return model, training


def measure_onnxruntime(model_folder: Path, repeats: int) -> dict:
    """The model alone in onnxruntime (no decoding): images/s at batch 1 and batch 32, on all
    CPUs and on one thread."""
    from service.core.classifier import ModelSource, available_cpus, load_classifier

    figures = {}
    for threads in sorted({available_cpus(), 1}, reverse=True):
        classifier = load_classifier(ModelSource(model_folder, "bench"), threads=threads)
        images = np.full((32, *classifier.spec.shape), 128, dtype=np.uint8)
        for batch in (1, 32):
            chunk = images[:batch]
            seconds = median_seconds(
                lambda c=classifier, x=chunk: c.predict(x), max(3, repeats // batch)
            )
            figures[f"threads_{threads}_batch_{batch}"] = {
                "images_per_second": round(batch / seconds, 1),
                "p50_ms": round(seconds * 1000, 3),
            }
    return figures


def batching_choice(model_folder: Path) -> dict:
    """What ``BATCHING=auto`` (the default) chooses for this model on this machine."""
    from service.core.classifier import ModelSource, load_classifier
    from service.http import adaptive_batching as batching
    from service.http.settings import ServiceSettings

    settings = ServiceSettings()
    threads = settings.onnx_threads(settings.api_workers)
    cost = batching.measure(load_classifier(ModelSource(model_folder, "bench"), threads=threads))
    return {
        "batch_1_ms": cost.batch_1_ms,
        "batch_8_ms_per_image": cost.batch_8_ms_per_image,
        "ratio": round(cost.ratio, 3),
        "chosen": "on" if batching.choose(cost) else "off",
    }


def measure_backbone(payloads: dict[str, bytes], seconds: float, quick: bool) -> dict:
    """A MobileNetV3-Small classifier trained by the job on photos: its training speed, the
    model alone in onnxruntime, the in-process limits of each payload, ``/classify`` with
    batching off and on, and the plain FastAPI app doing the same work (multipart and raw)."""
    import tempfile

    # The photo first: it is the "classify" series of both batching modes.
    payloads = {"jpeg": payloads["jpeg"]} | payloads
    with tempfile.TemporaryDirectory() as scratch:
        model, training = train_backbone(
            Path(scratch), *((12, 64, 2, 1) if quick else (150, 224, 10, 3))
        )
        results = {"training": training, "onnxruntime": measure_onnxruntime(model, 64)}
        results["batching_auto"] = batching_choice(model)
        results["payload_limits"] = measure_payload_limits(model, payloads, 1 if quick else 4)
        results["cam_cost"] = measure_cam_cost(model, rounds=2 if quick else 5)
        results["explain"] = measure_explain(
            model, {"jpeg": payloads["jpeg"]}, seconds, 1 if quick else 2, (1,) if quick else (1, 8)
        )
        # Every payload as shipped (BATCHING=auto's choice), the photo alone the other way.
        shipped = results["batching_auto"]["chosen"]
        for mode in ("off", "on"):
            names = tuple(payload_bodies(payloads)) if mode == shipped else ("jpeg multipart",)
            results[f"service_batching_{mode}"] = measure_service(
                model, [], payloads, mode == "on", seconds, with_batch_endpoint=False,
                payload_names=names,
            )  # fmt: skip
        results["shipped_batching"] = shipped
        results["plain_fastapi"] = measure_plain_fastapi(model, payloads, seconds)
    return results
