"""Scores to answers: calibrated softmax, the unknown-input verdict, the top k, and the one shape
of an answer that the HTTP service, the Open Inference Protocol and the CLI all give."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from service.core import explain
from service.core.contract import ModelContract

# Labels per answer when the caller does not say (fewer for a model with fewer classes).
DEFAULT_TOP_K = 3
# The label of an input that the model's unknown-input detector flags.
UNKNOWN_LABEL = "unknown"


class TopKError(ValueError):
    """A requested top-k outside 1..K; the message names the range."""


def choose_top_k(requested: int | None, num_classes: int, default: int = DEFAULT_TOP_K) -> int:
    """The top-k of a request: ``requested`` if given (refused outside 1..K), else ``default``
    capped at K (a two-class model answers its two classes).

    Raises:
        TopKError: ``requested`` is below 1, or above the number of classes.
    """
    if requested is None:
        return min(default, num_classes)
    if not 1 <= requested <= num_classes:
        raise TopKError(f"top_k must be between 1 and {num_classes}")
    return requested


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``(N, K)`` logits, shifted by the row maximum for stability.

    Returns:
        ``(N, K)`` float32 probabilities; each row sums to 1.
    """
    logits = np.asarray(logits, dtype=np.float32)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exponentials = np.exp(shifted)
    return exponentials / exponentials.sum(axis=-1, keepdims=True)


def top_k(probabilities: np.ndarray, labels: Sequence[str], k: int) -> list[list[dict]]:
    """The ``k`` most probable labels of each row, best first.

    Args:
        probabilities: ``(N, K)`` softmax output.
        labels: the K class names; ``labels[i]`` names output position ``i``.
        k: how many to keep, 1..K.

    Returns:
        One list per image of ``{"label": str, "score": float}``, sorted by falling score (ties
        keep the lower output position first, as argmax does).
    """
    order = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]
    return [
        [{"label": labels[position], "score": float(row[position])} for position in positions]
        for row, positions in zip(probabilities, order, strict=True)
    ]


@dataclass
class Predictions:
    """Scores and verdicts for N images."""

    probabilities: np.ndarray  # (N, K) float32, calibrated: softmax(logits / temperature)
    ood_scores: np.ndarray | None  # (N,) float32, or None for a model without a detector
    unknown: np.ndarray  # (N,) bool: flagged as unlike the training images
    cams: np.ndarray | None = None  # (N, h, w) float32 in [0, 1], or None for a model without

    def __len__(self) -> int:
        return len(self.probabilities)

    def margins(self) -> np.ndarray:
        """``(N,)`` the top-1 minus the top-2 probability of each image: small when the model
        hesitates between two classes."""
        if self.probabilities.shape[1] < 2:
            return np.ones(len(self), dtype=np.float32)
        top_two = np.partition(self.probabilities, -2, axis=1)[:, -2:]
        return top_two[:, 1] - top_two[:, 0]

    def verdicts(self, labels: Sequence[str]) -> list[str]:
        """Each image's verdict: its top class, or ``unknown`` when the detector flags it
        (what the metrics count, whatever an answer shows)."""
        best = self.probabilities.argmax(axis=1)
        return [
            UNKNOWN_LABEL if flagged else labels[int(position)]
            for position, flagged in zip(best, self.unknown, strict=True)
        ]


def calibrated_predictions(
    logits: np.ndarray,
    ood_scores: np.ndarray | None,
    contract: ModelContract,
    cams: np.ndarray | None = None,
) -> Predictions:
    """Calibrated probabilities (``softmax(logits / temperature)``) and the unknown-input
    verdicts (score above the contract's threshold) of ``(N, K)`` logits, with the maps of the
    top class when the model gives them.

    It fails closed: an input whose logits or unknown-input score are not finite numbers (an
    overflow inside the model) is flagged unknown, with even probabilities and the largest
    score, so that no answer carries NaN or Infinity and no NaN passes the detector."""
    logits = np.asarray(logits, dtype=np.float32)
    with np.errstate(all="ignore"):
        probabilities = softmax(logits / np.float32(contract.temperature))
    broken = ~np.isfinite(probabilities).all(axis=1)
    if broken.any():
        probabilities[broken] = np.float32(1.0 / probabilities.shape[1])
    if ood_scores is None:
        unknown = broken.copy()
    else:
        ood_scores = np.asarray(ood_scores, dtype=np.float32)
        broken_scores = ~np.isfinite(ood_scores)
        if broken_scores.any():
            ood_scores = np.where(broken_scores, np.finfo(np.float32).max, ood_scores)
        # ``not (score <= threshold)``: true for a NaN too, whatever happened above.
        unknown = ~(ood_scores <= contract.ood_threshold) | broken
    if cams is not None:
        cams = np.nan_to_num(np.asarray(cams, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return Predictions(probabilities, ood_scores, unknown, cams)


@dataclass(frozen=True)
class Answers:
    """The answers for N images: their predictions, ranked to the top ``k``, shaped once for
    every caller (``/classify``, ``/classify_batch``, the CLI's rows, OIP's classification)."""

    predictions: Predictions
    contract: ModelContract
    ranked: list[list[dict]]  # per image, the top k {"label", "score"}, best first
    unknown_label: bool = True  # show "unknown" as the label of a flagged input
    request_ids: tuple[str, ...] = ()  # per image, the id feedback names it by (the service's)
    # What the model looked at: explain.MAP adds each image's map as a grid ("cam"), and
    # ``overlays`` (PNG bytes per image) add "overlay_png", base64.
    explain: str = explain.NONE
    overlays: tuple[bytes, ...] = ()

    @classmethod
    def rank(
        cls,
        predictions: Predictions,
        contract: ModelContract,
        k: int,
        unknown_label: bool = True,
        request_ids: Sequence[str] = (),
    ) -> Answers:
        ranked = top_k(predictions.probabilities, contract.labels, k)
        return cls(predictions, contract, ranked, unknown_label, tuple(request_ids))

    def __len__(self) -> int:
        return len(self.ranked)

    def explained(self, overlays: Sequence[bytes] = ()) -> Answers:
        """These answers with each image's map (and overlay image, when given).

        Raises:
            ExplainError: the model has no map (its contract says why).
        """
        if self.predictions.cams is None:
            explain.require_map(self.contract)
        return dataclasses.replace(self, explain=explain.MAP, overlays=tuple(overlays))

    def shows_unknown(self, position: int) -> bool:
        """Whether answer ``position`` shows ``unknown`` as its label: the detector flags the
        input, and these answers show that (``UNKNOWN_LABEL=0`` shows the top class instead)."""
        return self.unknown_label and bool(self.predictions.unknown[position])

    def to_dicts(self) -> list[dict]:
        """One answer per image: the label, the top-1 score, the top k, the verdict, the
        unknown-input score and its threshold, the model, its request id (when it has one), and
        when explained its map (and overlay)."""
        model = {"name": self.contract.name, "version": self.contract.version}
        threshold = self.contract.ood_threshold
        scores = self.predictions.ood_scores
        answers = []
        for position, best in enumerate(self.ranked):
            unknown = bool(self.predictions.unknown[position])
            score = None if scores is None else round(float(scores[position]), 4)
            answers.append(
                {
                    "label": UNKNOWN_LABEL if self.shows_unknown(position) else best[0]["label"],
                    "score": best[0]["score"],
                    "top_k": best,
                    "unknown": unknown,
                    "ood_score": score,
                    "ood_threshold": threshold,
                    "model": model,
                }
            )
            if self.request_ids:
                answers[-1]["request_id"] = self.request_ids[position]
            if self.explain:
                answers[-1]["cam"] = explain.grid(self.predictions.cams[position])
            if self.overlays:
                overlay = base64.b64encode(self.overlays[position]).decode("ascii")
                answers[-1]["overlay_png"] = overlay
        return answers
