"""The floor of Python HTTP cost on this machine: the same work as ``/classify`` in a plain
FastAPI app on uvicorn (uvloop, httptools), with the image decoded the way a user would write it
(Pillow open, convert, resize), onnxruntime, softmax and the top 3. Benchmarked, never shipped.

    MODEL_PATH=artifacts/animals/latest uvicorn benchmarks.plain_fastapi:app --workers 2
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Annotated

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, File, Request, UploadFile
from PIL import Image

from service.core.contract import ModelContract

FOLDER = Path(os.environ["MODEL_PATH"])
CONTRACT = ModelContract.from_metadata(json.loads((FOLDER / "metadata.json").read_text()))
_options = ort.SessionOptions()
_options.intra_op_num_threads = 1  # one per worker process, as the service does on 2 cores
SESSION = ort.InferenceSession(str(FOLDER / "model.onnx"), _options)
MODE = {1: "L", 3: "RGB"}[CONTRACT.image.channels]

app = FastAPI()


def classify_bytes(data: bytes) -> dict:
    spec = CONTRACT.image
    image = Image.open(io.BytesIO(data)).convert(MODE).resize((spec.width, spec.height))
    pixels = np.asarray(image, dtype=np.float32).reshape(1, *spec.shape)
    logits = SESSION.run([CONTRACT.output_name], {CONTRACT.input_name: pixels})[0][0]
    scores = np.exp(logits - logits.max())
    scores /= scores.sum()
    best = np.argsort(-scores)[:3]
    top = [{"label": CONTRACT.labels[i], "score": float(scores[i])} for i in best]
    return {"label": top[0]["label"], "score": top[0]["score"], "top_k": top}


@app.get("/readyz")
async def ready() -> dict:
    return {"ready": True}


@app.post("/classify")
async def classify(image: Annotated[UploadFile, File()]) -> dict:
    return classify_bytes(await image.read())


@app.post("/classify_raw")
async def classify_raw(request: Request) -> dict:
    return classify_bytes(await request.body())
