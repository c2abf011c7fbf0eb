"""What a BentoML user would write from BentoML's own docs: an ``@bentoml.api`` method that takes
a PIL image (BentoML parses the multipart upload), resizes it, runs onnxruntime and returns the
top label. Same model, same worker count as the service. Benchmarked, never shipped.

    MODEL_PATH=artifacts/animals/latest bentoml serve benchmarks.docs_style_service:DocsStyle
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import bentoml
import numpy as np
import onnxruntime as ort
from PIL.Image import Image

from service.core.contract import ModelContract
from service.http.settings import ServiceSettings


@bentoml.service(name="docs_style", workers=ServiceSettings().api_workers)
class DocsStyle:
    def __init__(self) -> None:
        folder = Path(os.environ["MODEL_PATH"])
        self.contract = ModelContract.from_metadata(
            json.loads((folder / "metadata.json").read_text())
        )
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # one per worker on 2 cores, as the service
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options)

    @bentoml.api
    def classify(self, image: Image) -> dict:
        spec = self.contract.image
        mode = "L" if spec.channels == 1 else "RGB"
        resized = image.convert(mode).resize((spec.width, spec.height))
        pixels = np.asarray(resized, dtype=np.float32).reshape(1, *spec.shape)
        logits = self.session.run(None, {self.contract.input_name: pixels})[0][0]
        scores = np.exp(logits - logits.max())
        scores /= scores.sum()
        best = int(np.argmax(scores))
        return {"label": self.contract.labels[best], "score": float(scores[best])}
