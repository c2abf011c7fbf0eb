"""What a user would build instead: Keras ``model.predict`` per request in a minimal BentoML
endpoint (TensorFlow in every worker). Benchmarked against the real service, never shipped."""

from __future__ import annotations

import os
from pathlib import Path

import bentoml
import numpy as np

from service.core.contract import ModelContract
from service.core.postprocessing import softmax
from service.core.preprocessing import preprocess_bytes


@bentoml.service(name="naive_keras", workers=int(os.environ.get("WORKERS", "2")))
class NaiveKerasClassifier:
    def __init__(self) -> None:
        import json

        import keras

        folder = Path(os.environ["MODEL_PATH"])
        self.model = keras.saving.load_model(folder / "model.keras")
        contract = ModelContract.from_metadata(json.loads((folder / "metadata.json").read_text()))
        self.labels, self.spec = contract.labels, contract.image

    @bentoml.api
    def classify(self, image: Path) -> dict:
        pixels = preprocess_bytes(image.read_bytes(), self.spec)[np.newaxis].astype(np.float32)
        probabilities = softmax(self.model.predict(pixels, verbose=0))[0]
        best = int(np.argmax(probabilities))
        return {"label": self.labels[best], "score": float(probabilities[best])}
