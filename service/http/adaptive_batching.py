"""Whether the service runs onnxruntime behind BentoML's adaptive batching: ``BATCHING=on|off``,
or ``auto`` (the default), which decides from the served model's own cost, measured at start-up.

Batching sends each request's pixels to a model process (one more hop, a copy of the batch) so
that concurrent requests share one onnxruntime call. That pays when one call over a batch costs
much less per image than a call per image. Measured on the models this project trains, on CPU
(BENCHMARKS.md), it did not: the from-scratch CNN (0.45 ms per image, batch 8 costing 0.96 of
batch 1 per image) and MobileNetV3-Small at 224 (5.6 ms, 0.86) both served faster with batching
off. The rule, :func:`choose`, keeps that measured behaviour and turns batching on only where a
batch clearly pays: per-image cost at batch 8 at most half of batch 1, on a model of at least
1 ms (for cheaper models the hop is the larger cost).

The decision is made once, by the start-up of the ``bentoml serve`` process
(:func:`service.http.app.start`), and handed to the worker processes it starts through their
inherited environment (:func:`hand_down`): every process agrees, and the workers do not measure
again.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass

import numpy as np

from service.core.timing import median_seconds
from service.http.settings import BATCHING_AUTO, BATCHING_OFF, BATCHING_ON

MIN_BATCH_1_MS = 1.0
MAX_BATCH_COST_RATIO = 0.5
PROBE_BATCH = 8
# The environment variables that carry the decision to the worker processes.
DECISION_VARIABLE, MEASURED_VARIABLE = "BATCHING", "BATCHING_MEASURED"


@dataclass(frozen=True)
class ModelCost:
    """onnxruntime's median latency for one image, and per image in a batch of 8."""

    batch_1_ms: float
    batch_8_ms_per_image: float

    @property
    def ratio(self) -> float:
        return self.batch_8_ms_per_image / self.batch_1_ms


def choose(cost: ModelCost) -> bool:
    """Batching on iff the model costs at least 1 ms per image and a batch of 8 at most halves
    that cost per image."""
    return cost.batch_1_ms >= MIN_BATCH_1_MS and cost.ratio <= MAX_BATCH_COST_RATIO


def measure(classifier, repeats: int = 15) -> ModelCost:
    """Time ``classifier`` (on the threads it was loaded with) on mid-grey images."""
    images = np.full((PROBE_BATCH, *classifier.spec.shape), 128, dtype=np.uint8)
    one = median_seconds(lambda: classifier.predict(images[:1]), repeats) * 1000
    eight = median_seconds(lambda: classifier.predict(images), max(3, repeats // 3)) * 1000
    return ModelCost(round(one, 3), round(eight / PROBE_BATCH, 3))


def decision_line(cost: ModelCost, enabled: bool) -> str:
    """The one line the serving log gets about an ``auto`` decision."""
    return (
        f"BATCHING=auto: onnxruntime takes {cost.batch_1_ms:.3f} ms for one image and "
        f"{cost.batch_8_ms_per_image:.3f} ms per image in a batch of {PROBE_BATCH} (ratio "
        f"{cost.ratio:.2f}): adaptive batching {BATCHING_ON if enabled else BATCHING_OFF}"
    )


def hand_down(enabled: bool, cost: ModelCost | None, environ: MutableMapping[str, str]) -> None:
    """Record the decision (and the cost it was made on) in ``environ``, which the processes
    started after this one inherit."""
    environ[DECISION_VARIABLE] = BATCHING_ON if enabled else BATCHING_OFF
    if cost is not None:
        environ[MEASURED_VARIABLE] = f"{cost.batch_1_ms},{cost.batch_8_ms_per_image}"


def measured_cost(environ: MutableMapping[str, str]) -> ModelCost | None:
    """The cost an ``auto`` decision handed down was made on, if one was measured."""
    measured = environ.get(MEASURED_VARIABLE, "")
    if not measured:
        return None
    one, eight = (float(value) for value in measured.split(","))
    return ModelCost(one, eight)


def batching_status(setting: str, enabled: bool, cost: ModelCost | None) -> dict:
    """The decision as ``GET /model`` shows it: on or off, how it was made, and the measured
    cost when ``auto`` measured it."""
    status = {"enabled": enabled, "setting": BATCHING_AUTO if cost else setting}
    if cost:
        status["measured"] = {
            "batch_1_ms": cost.batch_1_ms,
            f"batch_{PROBE_BATCH}_ms_per_image": cost.batch_8_ms_per_image,
        }
        status["rule"] = (
            f"on when one image takes at least {MIN_BATCH_1_MS} ms and a batch of {PROBE_BATCH} "
            f"costs at most {MAX_BATCH_COST_RATIO} of that per image"
        )
    return status
