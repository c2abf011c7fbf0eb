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

The decision is made once, in the ``bentoml serve`` process that imports the service first, and
written to ``BATCHING`` in its environment, which the worker processes inherit: every process
agrees, and the workers do not measure again.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np

from service.timing import median_seconds

MIN_BATCH_1_MS = 1.0
MAX_BATCH_COST_RATIO = 0.5
PROBE_BATCH = 8
ON, OFF, AUTO = "on", "off", "auto"
WORDS = {"1": ON, "true": ON, "yes": ON, "on": ON, "0": OFF, "false": OFF, "no": OFF, "off": OFF}


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


def parse(value: str) -> str:
    """``on``, ``off`` or ``auto`` from a ``BATCHING`` value (1/0, true/false also taken)."""
    word = value.strip().lower()
    if word == AUTO:
        return AUTO
    if word not in WORDS:
        raise ValueError(f"BATCHING={value!r}: use on, off or auto")
    return WORDS[word]


def resolve(setting: str, load_classifier, environ=os.environ) -> bool:
    """The batching decision for ``BATCHING=setting``. For ``auto``, load the model with
    ``load_classifier()``, measure it, decide, and record the decision in ``environ`` for the
    processes started after this one. A model that cannot be loaded here leaves batching off
    (the workers then refuse it, each with its one-line reason)."""
    mode = parse(setting)
    if mode != AUTO:
        return mode == ON
    try:
        cost = measure(load_classifier())
    except Exception as error:  # the workers report an unservable model themselves
        print(
            f"BATCHING=auto: the model could not be timed ({error}); batching off", file=sys.stderr
        )
        environ["BATCHING"] = OFF
        return False
    enabled = choose(cost)
    # One line in the serving log (the logging of this process is not set up yet).
    print(
        f"BATCHING=auto: onnxruntime takes {cost.batch_1_ms:.3f} ms for one image and "
        f"{cost.batch_8_ms_per_image:.3f} ms per image in a batch of {PROBE_BATCH} (ratio "
        f"{cost.ratio:.2f}): adaptive batching {ON if enabled else OFF}",
        file=sys.stderr,
        flush=True,
    )
    environ["BATCHING"] = ON if enabled else OFF
    environ["BATCHING_MEASURED"] = f"{cost.batch_1_ms},{cost.batch_8_ms_per_image}"
    return enabled


def describe(setting: str, enabled: bool, environ=os.environ) -> dict:
    """The decision as ``GET /model`` shows it: on or off, how it was made, and the measured
    cost when ``auto`` measured it."""
    measured = environ.get("BATCHING_MEASURED", "")
    answer = {"enabled": enabled, "setting": AUTO if measured else parse(setting)}
    if measured:
        one, eight = (float(value) for value in measured.split(","))
        answer["measured"] = {"batch_1_ms": one, f"batch_{PROBE_BATCH}_ms_per_image": eight}
        answer["rule"] = (
            f"on when one image takes at least {MIN_BATCH_1_MS} ms and a batch of {PROBE_BATCH} "
            f"costs at most {MAX_BATCH_COST_RATIO} of that per image"
        )
    return answer
