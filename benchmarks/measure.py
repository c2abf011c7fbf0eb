"""The measurements of one benchmark run, each a function returning plain figures."""

from __future__ import annotations

import contextlib
import time
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np

from benchmarks.servers import ROOT, batch_size_counters, process_tree_rss, run_load, server
from benchmarks.wrk import multipart_body, run_wrk
from service.core.timing import median_seconds

CONCURRENCY = (1, 8, 32)
BATCH_IMAGES = 64
# The request bodies of the load: each payload as multipart (a browser, curl -F) and raw.
PAYLOAD_TYPES = {"png": "image/png", "jpeg": "image/jpeg"}


def payload_bodies(payloads: dict[str, bytes]) -> dict[str, tuple[bytes, str]]:
    """``{"png multipart": (body, content type), "png raw": ..., "jpeg multipart": ...}``."""
    bodies = {}
    for name, data in payloads.items():
        content_type = PAYLOAD_TYPES[name]
        bodies[f"{name} multipart"] = multipart_body("image", f"image.{name}", content_type, data)
        bodies[f"{name} raw"] = (data, content_type)
    return bodies


# --- the limit: in one process, no HTTP ------------------------------------------------------


def measure_limit(model_folder: Path, images: list[bytes], repeats: int) -> dict:
    """Decode + preprocess + onnxruntime, batch 1 and batch 64, with all CPUs for onnxruntime."""
    from service.core.classifier import ModelSource, available_cpus, load_classifier

    classifier = load_classifier(ModelSource(model_folder, "bench"), threads=available_cpus())

    def one(data: bytes) -> None:
        classifier.predict(classifier.preprocess(data)[np.newaxis])

    def batch(chunk: list[bytes]) -> None:
        classifier.predict(np.stack([classifier.preprocess(data) for data in chunk]))

    for data in images[:10]:
        one(data)
    timings = []
    for index in range(repeats):
        started = time.perf_counter()
        one(images[index % len(images)])
        timings.append(time.perf_counter() - started)
    batch_timings = []
    for _ in range(max(3, repeats // BATCH_IMAGES)):
        started = time.perf_counter()
        batch(images[:BATCH_IMAGES])
        batch_timings.append(time.perf_counter() - started)
    decode = []
    for data in images:
        started = time.perf_counter()
        classifier.preprocess(data)
        decode.append(time.perf_counter() - started)
    return {
        "batch_1": {
            "images_per_second": round(1 / float(np.mean(timings)), 1),
            "p50_ms": round(float(np.median(timings)) * 1000, 3),
        },
        "batch_64": {
            "images_per_second": round(BATCH_IMAGES / float(np.median(batch_timings)), 1),
            "p50_ms": round(float(np.median(batch_timings)) * 1000, 3),
        },
        "decode_preprocess_us": round(float(np.median(decode)) * 1e6, 1),
    }


def _classify_for(model_folder: str, data: bytes, seconds: float) -> int:
    """Classify ``data`` again and again for ``seconds`` in this process, one onnxruntime
    thread: decode, preprocess, predict, postprocess, as one request does. Returns the count."""
    from service.core.classifier import ModelSource, load_classifier

    classifier = load_classifier(ModelSource(Path(model_folder), "bench"), threads=1)
    for _ in range(20):  # warm-up
        classifier.classify(classifier.preprocess(data)[np.newaxis], 1)
    count, deadline = 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        classifier.classify(classifier.preprocess(data)[np.newaxis], 1)
        count += 1
    return count


def measure_int8(model_folder: Path, images: list[bytes]) -> dict:
    """onnxruntime on one thread, batch 1, for the model and its int8 quantization (calibrated
    here on the sample images: speed only; the training job's int8 gate measures accuracy)."""
    import onnx

    from service.core.classifier import ModelSource, load_classifier
    from training.export.quantize import batch_1_microseconds, one_thread_session, quantize_int8

    classifier = load_classifier(ModelSource(model_folder, "bench"), threads=1)
    inputs = np.stack([classifier.preprocess(data) for data in images]).astype(np.float32)
    proto = onnx.load(str(model_folder / "model.onnx"))
    if classifier.contract.precision == "int8":
        return {"skipped": "the model is already int8"}
    quantized = quantize_int8(proto, inputs)
    contract = classifier.contract
    float_us = batch_1_microseconds(one_thread_session(proto), contract, inputs[0], 2000)
    int8_us = batch_1_microseconds(one_thread_session(quantized), contract, inputs[0], 2000)
    return {"batch_1_us_float32": float_us, "batch_1_us_int8": int8_us}


def measure_payload_limits(model_folder: Path, payloads: dict[str, bytes], seconds: float) -> dict:
    """Images/s of one request's work without HTTP, per payload: in one process with one thread,
    and in one process per CPU (all cores; Python's lock rules out threads)."""
    from concurrent.futures import ProcessPoolExecutor

    from service.core.classifier import available_cpus

    cpus = available_cpus()
    limits = {}
    for name, data in payloads.items():
        with ProcessPoolExecutor(1) as pool:
            one = pool.submit(_classify_for, str(model_folder), data, seconds).result()
        with ProcessPoolExecutor(cpus) as pool:
            jobs = [
                pool.submit(_classify_for, str(model_folder), data, seconds) for _ in range(cpus)
            ]
            every = sum(job.result() for job in jobs)
        limits[name] = {
            "one_thread_images_per_second": round(one / seconds, 1),
            "all_cores_images_per_second": round(every / seconds, 1),
            "cores": cpus,
        }
    return limits


def measure_service(
    model_folder: Path,
    image_files: list[Path],
    payloads: dict[str, bytes],
    batching: bool,
    seconds: float,
    with_batch_endpoint: bool,
    payload_names: tuple[str, ...] | None = None,
) -> dict:
    """``/classify`` under wrk at each concurrency, for each payload (the multipart PNG alone
    with batching on, or the ``payload_names`` given), with the server's CPU per request and its
    split across processes."""
    with server(
        "service.service:ImageClassifier", model_folder, BATCHING="1" if batching else "0"
    ) as (url, ready_seconds, pid):
        rss = process_tree_rss(pid)
        bodies = payload_bodies(payloads)
        names = payload_names or (("png multipart",) if batching else tuple(bodies))
        bodies = {name: bodies[name] for name in names}
        runs: dict[str, list[dict]] = {}
        for name, (body, content_type) in bodies.items():
            runs[name] = []
            for concurrency in CONCURRENCY:
                before = batch_size_counters(url)
                result = run_wrk(
                    f"{url}/classify", body, content_type, concurrency, seconds, server_pid=pid
                )
                after = batch_size_counters(url)
                images, calls = after[0] - before[0], after[1] - before[1]
                result["mean_batch_size"] = round(images / calls, 2) if calls else None
                runs[name].append(result)
        batch_endpoint = None
        if with_batch_endpoint:
            (batch_endpoint,) = run_load(
                url,
                image_files,
                (2,),
                max(4, int(seconds * 10)),
                seconds,
                endpoint="/classify_batch",
                batch=BATCH_IMAGES,
            )
        return {
            "ready_seconds": round(ready_seconds, 2),
            "rss_mib_per_process": [round(size / 2**20, 1) for size in rss],
            "classify": runs[names[0]],
            "payloads": runs,
            "classify_batch": batch_endpoint,
        }


# The production loop's settings, compared in interleaved rounds: nothing kept; every
# prediction recorded for feedback; feedback with the hard inputs captured (as the feedback
# overlay deploys it); and, the worst case, every input also captured.
LOOP_SETTINGS = {
    "off": {},
    "feedback": {"FEEDBACK_TOKEN": "bench"},
    "feedback_capture_hard": {"FEEDBACK_TOKEN": "bench", "CAPTURE": "hard"},
    "feedback_capture_all": {"FEEDBACK_TOKEN": "bench", "CAPTURE": "sample:1"},
}


def measure_loop(
    model_folder: Path, payloads: dict[str, bytes], seconds: float, rounds: int = 2
) -> dict:
    """``/classify`` multipart at concurrency 8 with feedback and capture off and on, each
    setting served ``rounds`` times in interleaved rounds (A, B, C, A, B, C) on a fresh server
    and a fresh store: per setting and payload, the median p50 and images/s over the rounds."""
    import statistics
    import tempfile

    bodies = {name: body for name, body in payload_bodies(payloads).items() if "multipart" in name}
    runs: dict[str, dict[str, list[dict]]] = {name: {} for name in LOOP_SETTINGS}
    for _ in range(rounds):
        for name, settings in LOOP_SETTINGS.items():
            with tempfile.TemporaryDirectory() as scratch:
                environment = {"CAPTURE_DIR": f"{scratch}/captured", "FEEDBACK_DIR": scratch}
                with server(
                    "service.service:ImageClassifier", model_folder, **settings, **environment
                ) as (url, _, pid):
                    for payload, (body, content_type) in bodies.items():
                        result = run_wrk(
                            f"{url}/classify", body, content_type, 8, seconds, server_pid=pid
                        )
                        runs[name].setdefault(payload, []).append(result)
    return {
        name: {
            payload: {
                "p50_ms": statistics.median(run["p50_ms"] for run in results),
                "p50_ms_rounds": [run["p50_ms"] for run in results],
                "images_per_second": statistics.median(run["images_per_second"] for run in results),
            }
            for payload, results in by_payload.items()
        }
        for name, by_payload in runs.items()
    }


def measure_plain_fastapi(model_folder: Path, payloads: dict[str, bytes], seconds: float) -> dict:
    """The same work in a plain FastAPI app on uvicorn, as many workers as the service."""
    from service.http.settings import ServiceSettings

    workers = ServiceSettings().api_workers
    with server("benchmarks.plain_fastapi:app", model_folder, uvicorn_workers=workers) as (
        url,
        ready,
        pid,
    ):
        runs: dict[str, list[dict]] = {}
        for name, (body, content_type) in payload_bodies(payloads).items():
            path = "/classify" if name.endswith("multipart") else "/classify_raw"
            runs[name] = [
                run_wrk(f"{url}{path}", body, content_type, concurrency, seconds, server_pid=pid)
                for concurrency in CONCURRENCY
            ]
    return {"ready_seconds": round(ready, 2), "payloads": runs}


def measure_docs_style(model_folder: Path, payloads: dict[str, bytes], seconds: float) -> dict:
    """The service as BentoML's docs show it (``benchmarks/docs_style_service.py``), multipart,
    as many workers as the service."""
    with server("benchmarks.docs_style_service:DocsStyle", model_folder) as (url, ready, pid):
        runs: dict[str, list[dict]] = {}
        for name, (body, content_type) in payload_bodies(payloads).items():
            if not name.endswith("multipart"):
                continue  # a PIL image parameter takes a multipart upload
            runs[name] = [
                run_wrk(f"{url}/classify", body, content_type, concurrency, seconds, server_pid=pid)
                for concurrency in CONCURRENCY
            ]
    return {"ready_seconds": round(ready, 2), "payloads": runs}


def measure_cli(model_folder: Path, photo: bytes, files: int) -> dict:
    """The offline CLI (``python -m service.predict``) on a folder of ``files`` copies of a
    photo, with decoding in one process per CPU and in this process only: images/s from its own
    timing (start-up, model load and the output file excluded)."""
    import re
    import subprocess
    import sys
    import tempfile

    from service.core.classifier import available_cpus

    runs = {}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "photos"
        folder.mkdir()
        for index in range(files):
            (folder / f"{index:05d}.jpg").write_bytes(photo)
        for decoders in (available_cpus(), 1):
            result = subprocess.run(
                [sys.executable, "-m", "service.predict", str(folder), "--model",
                 str(model_folder), "--format", "csv", "--output", str(Path(scratch) / "out.csv"),
                 "--decoders", str(decoders)],
                cwd=ROOT, capture_output=True, text=True, check=True,
            )  # fmt: skip
            rate = re.search(r"\(([\d.]+) images/s", result.stdout + result.stderr)
            runs[decoders] = float(rate[1])
    return {
        "files": files,
        "decoders": available_cpus(),
        "images_per_second": runs[available_cpus()],
        "one_process_images_per_second": runs[1],
    }


def measure_naive(model_folder: Path, png: bytes, seconds: float) -> dict:
    body, content_type = multipart_body("image", "image.png", "image/png", png)
    with server("benchmarks.naive_service:NaiveKerasClassifier", model_folder) as (url, ready, _):
        runs = [
            run_wrk(f"{url}/classify", body, content_type, concurrency, seconds)
            for concurrency in CONCURRENCY
        ]
    return {"ready_seconds": round(ready, 2), "classify": runs}


# --- footprint ---------------------------------------------------------------------------------


def installed_size(requirements: list[str]) -> float:
    """MiB on disk of the given distributions and everything they require, transitively."""
    import re

    seen: set[str] = set()
    queue = [re.split(r"[<>=!\[;\s]", requirement)[0] for requirement in requirements]
    total = 0
    while queue:
        name = queue.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            distribution = importlib_metadata.distribution(name)
        except importlib_metadata.PackageNotFoundError:
            continue
        for file in distribution.files or []:
            with contextlib.suppress(OSError):
                total += Path(file.locate()).stat().st_size
        for requirement in distribution.requires or []:
            if "extra ==" in requirement:
                continue
            queue.append(re.split(r"[<>=!\[;\s(]", requirement)[0])
    return round(total / 2**20, 1)


def measure_footprint() -> dict:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = project["dependencies"]
    serving = installed_size(base + project["optional-dependencies"]["serve"])
    training = installed_size(base + project["optional-dependencies"]["train"])
    return {
        "serving_mib": serving,
        "training_mib": training,
        "serving_over_training": round(serving / training, 3),
    }


# --- training ----------------------------------------------------------------------------------


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


# --- a pretrained backbone ---------------------------------------------------------------------

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
         "--name", "backbone", "--no-publish"],
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


# --- class activation maps ---------------------------------------------------------------------

# /classify's explain values compared: the answer alone, with the map, with the map and overlay.
EXPLAIN_QUERIES = {"off": "", "map": "?explain=1", "png": "?explain=png"}


def without_cam(model_folder: Path) -> bytes:
    """The model's graph without its ``cam`` output and the nodes only that output needs (what
    the export would give without the map): onnx's own extractor keeps the nodes the other
    outputs need."""
    import onnx
    from onnx.utils import Extractor

    from service.core.contract import ModelContract

    proto = onnx.load(str(model_folder / "model.onnx"))
    contract = ModelContract.read_from_onnx(proto)
    kept = [output.name for output in proto.graph.output if output.name != contract.cam_output_name]
    return Extractor(proto).extract_model([contract.input_name], kept).SerializeToString()


def measure_cam_cost(model_folder: Path, rounds: int = 5, budget_seconds: float = 0.5) -> dict:
    """onnxruntime, one thread, batch 1: the exported graph against the same graph without its
    ``cam`` output, in interleaved rounds (A, B, C, A, B, C). The exported graph is run asking
    for every output and asking for the logits alone: onnxruntime runs the whole graph either
    way, so the map costs whether or not an answer shows it.

    Returns:
        Per variant the median microseconds over the rounds and their spread (min, max), and
        the ratio of the medians with the map to without.
    """
    import statistics

    from service.core.classifier import ModelSource, load_classifier, open_session

    classifier = load_classifier(ModelSource(model_folder, "bench"), threads=1)
    contract = classifier.contract
    if not contract.has_cam:
        return {"skipped": "the model has no class activation map"}
    feed = {contract.input_name: np.full((1, *contract.image.shape), 128, dtype=np.float32)}
    with_map, others = classifier.session, classifier.output_names[:-1]
    variants = {
        "without_cam": (open_session(without_cam(model_folder), 1), others),
        "with_cam_logits_asked": (with_map, [contract.output_name]),
        "with_cam_all_asked": (with_map, classifier.output_names),
    }
    once = median_seconds(lambda: with_map.run(None, feed), 20)
    repeats = max(30, int(budget_seconds / once))
    timings: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (session, names) in variants.items():
            seconds = median_seconds(lambda s=session, n=names: s.run(n, feed), repeats)
            timings[name].append(seconds * 1e6)
    figures = {
        name: {
            "median_us": round(statistics.median(values), 1),
            "spread_us": [round(min(values), 1), round(max(values), 1)],
        }
        for name, values in timings.items()
    }
    without = figures["without_cam"]["median_us"]
    return figures | {
        "repeats_per_round": repeats,
        "rounds": rounds,
        "cam_shape": list(contract.cam_shape),
        "with_over_without": round(figures["with_cam_all_asked"]["median_us"] / without, 3),
        "logits_asked_over_without": round(
            figures["with_cam_logits_asked"]["median_us"] / without, 3
        ),
    }


def measure_explain(
    model_folder: Path,
    payloads: dict[str, bytes],
    seconds: float,
    rounds: int = 2,
    concurrency: tuple[int, ...] = (1, 8),
) -> dict:
    """``/classify`` multipart with ``explain`` off, ``1`` (the map) and ``png`` (the map and
    the overlay image) on one server, each payload's three in interleaved rounds (A, B, C, A, B,
    C) at each concurrency: per payload, mode and concurrency, the median p50 and images/s over
    the rounds."""
    import statistics

    bodies = {name: body for name, body in payload_bodies(payloads).items() if "multipart" in name}
    runs: dict = {}
    with server("service.service:ImageClassifier", model_folder) as (url, _, pid):
        for _ in range(rounds):
            for payload, (body, content_type) in bodies.items():
                for clients in concurrency:
                    for mode, query in EXPLAIN_QUERIES.items():
                        result = run_wrk(
                            f"{url}/classify{query}", body, content_type, clients, seconds,
                            server_pid=pid,
                        )  # fmt: skip
                        runs.setdefault(payload, {}).setdefault(f"c{clients}", {})
                        runs[payload][f"c{clients}"].setdefault(mode, []).append(result)
    return {
        payload: {
            level: {
                mode: {
                    "p50_ms": statistics.median(run["p50_ms"] for run in results),
                    "p50_ms_rounds": [run["p50_ms"] for run in results],
                    "images_per_second": statistics.median(
                        run["images_per_second"] for run in results
                    ),
                    "errors": sum(run["errors"] for run in results),
                }
                for mode, results in by_mode.items()
            }
            for level, by_mode in by_level.items()
        }
        for payload, by_level in runs.items()
    }
