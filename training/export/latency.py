"""What the export measures beside the gate: Keras ``predict`` against onnxruntime, batch 1
and 32."""

from __future__ import annotations

import numpy as np

from service.core.contract import ModelContract
from service.core.timing import median_seconds
from training.export.gate import run_session


def measure_latency(model, session, contract: ModelContract, inputs: np.ndarray) -> dict:
    """Median latency of Keras ``predict`` versus onnxruntime for 1 and 32 images."""
    figures = {}
    for batch in (1, 32):
        sample = inputs[:batch]
        keras_seconds = median_seconds(lambda s=sample: model.predict(s, verbose=0), 15)
        onnx_seconds = median_seconds(lambda s=sample: run_session(session, contract, s), 100)
        figures[f"batch_{batch}"] = {
            "keras_predict_ms": round(keras_seconds * 1000, 3),
            "onnxruntime_ms": round(onnx_seconds * 1000, 3),
            "keras_over_onnxruntime": round(keras_seconds / onnx_seconds, 1),
        }
    return figures


def report_latency(model, session, contract: ModelContract, inputs: np.ndarray) -> dict:
    """:func:`measure_latency`, each batch size's figures printed as the run goes."""
    latency = measure_latency(model, session, contract, inputs)
    for batch, figures in latency.items():
        print(
            f"latency {batch}: Keras predict {figures['keras_predict_ms']} ms, onnxruntime "
            f"{figures['onnxruntime_ms']} ms ({figures['keras_over_onnxruntime']}x)"
        )
    return latency
