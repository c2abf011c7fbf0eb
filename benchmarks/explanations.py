"""The class activation map's measurements: what the map costs inside the graph, and
``/classify`` with ``explain`` off, as numbers and as an overlay image."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.measure import payload_bodies
from benchmarks.servers import server
from benchmarks.wrk import run_wrk
from service.core.timing import median_seconds

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
