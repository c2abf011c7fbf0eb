"""``POST /feedback``: true labels for earlier answers, stored in the prediction log that every
replica shares (:mod:`service.store.log`), joined to their predictions whenever those land,
counted once in the metrics (live accuracy and the live confusion matrix), and attached to
captured inputs for the next training run.

Feedback may train the next model, so it takes a bearer token (``FEEDBACK_TOKEN``); with none
configured the route is off. All ids of a request are stored together or not at all: ``200``
when every one joined its prediction, ``202`` when some wait for theirs (``pending``).
"""

from __future__ import annotations

import hmac

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.core.capture_layout import is_safe_name
from service.http.bodies import read_body
from service.http.errors import ApiError
from service.http.metrics import NEW_CLASS, Metrics
from service.http.oip import parse_json
from service.http.pipeline import ClassificationService, Service
from service.http.request_ids import ISSUED_PATTERN as REQUEST_ID
from service.store.log import Claim, DatabaseUnavailable

router = APIRouter()
MAX_ITEMS = 1000
MAX_LABEL_LENGTH = 100
# 1000 items of the longest id and label, with room to spare.
MAX_BODY_BYTES = 1024 * 1024
BEARER = {"WWW-Authenticate": "Bearer"}


def is_safe_label(label: object) -> bool:
    """Whether ``label`` may be stored: it becomes a class folder of the next training run, so
    it is checked exactly as it is stored (:func:`service.core.capture_layout.is_safe_name`)."""
    return isinstance(label, str) and len(label) <= MAX_LABEL_LENGTH and is_safe_name(label)


def check_token(request: Request, service: ClassificationService) -> None:
    """The caller's bearer token against ``FEEDBACK_TOKEN``, compared in constant time."""
    expected = service.settings.feedback_token
    if not expected:
        raise ApiError(404, "feedback_off", "feedback is off: the service has no FEEDBACK_TOKEN")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        service.metrics.feedback_rejected.labels("missing_token").inc()
        raise ApiError(
            401, "unauthorized", "send the feedback token: Authorization: Bearer <token>", BEARER
        )
    if not hmac.compare_digest(token.encode(), expected.encode()):
        service.metrics.feedback_rejected.labels("wrong_token").inc()
        raise ApiError(401, "unauthorized", "the feedback token is wrong", BEARER)


def parse_items(body: object) -> dict[str, str]:
    """``{request_id: label}`` from ``{"request_id", "label"}`` or a list of them (the last
    label of an id wins)."""
    items = body if isinstance(body, list) else [body]
    if not 1 <= len(items) <= MAX_ITEMS:
        raise ApiError(400, "invalid_feedback", f"send 1 to {MAX_ITEMS} feedback items")
    labels: dict[str, str] = {}
    for position, item in enumerate(items):
        where = f"item {position}: " if isinstance(body, list) else ""
        if not isinstance(item, dict) or set(item) != {"request_id", "label"}:
            raise ApiError(
                400, "invalid_feedback", f'{where}send {{"request_id": "...", "label": "..."}}'
            )
        request_id, label = item["request_id"], item["label"]
        if not isinstance(request_id, str) or not REQUEST_ID.match(request_id):
            raise ApiError(400, "invalid_request_id", f"{where}request_id is not an id we issue")
        label = label.strip() if isinstance(label, str) else label
        if not is_safe_label(label):
            raise ApiError(
                400,
                "invalid_label",
                f"{where}label must be a class name of 1 to {MAX_LABEL_LENGTH} printable "
                "characters, with no / \\ or :, and not starting with .",
            )
        labels[request_id] = label
    return labels


def count(metrics: Metrics, claim: Claim, known: set[str]) -> None:
    """Count one claimed label, replacing the label counted before for its prediction (if any)."""
    previous, label = claim.previous, claim.label
    if previous == label:
        return  # the same feedback again counts once
    if previous is None:
        metrics.feedback_predictions.inc()
        metrics.feedback_score.inc(claim.score)
    else:
        replaced = previous if previous in known else NEW_CLASS
        correct = str(previous == claim.predicted).lower()
        metrics.feedback_replaced.labels(claim.predicted, replaced, correct).inc()
    if label in known:
        correct = str(label == claim.predicted).lower()
        metrics.feedback.labels(claim.predicted, label, correct).inc()
    else:
        metrics.feedback_new_class.labels(claim.predicted).inc()


@router.post(
    "/feedback",
    summary="True labels for earlier answers: {request_id, label} or a list (bearer token)",
)
async def feedback(request: Request, service: Service) -> JSONResponse:
    check_token(request, service)
    text = await read_body(request, MAX_BODY_BYTES, "the feedback")
    labels = parse_items(parse_json(text, "the feedback"))
    known = set(service.classifier.labels)
    try:
        recorded = await anyio.to_thread.run_sync(service.log.record_labels, labels, known)
    except DatabaseUnavailable:
        raise ApiError(
            503,
            "database_unavailable",
            "the prediction log's database cannot be reached; nothing was recorded: send the "
            "labels again later",
        ) from None
    metrics = service.metrics
    if recorded.joined:
        metrics.feedback_received.labels("joined").inc(len(recorded.joined))
    if recorded.pending:
        metrics.feedback_received.labels("pending").inc(len(recorded.pending))
    body = {
        "recorded": len(labels),
        "joined": len(recorded.joined),
        "pending": len(recorded.pending),
        "new_class": sum(label not in known for label in labels.values()),
    }
    if recorded.pending:
        # Accepted, and joined when the prediction lands (or orphaned after the retention).
        return JSONResponse({**body, "pending_ids": recorded.pending}, status_code=202)
    return JSONResponse(body)
