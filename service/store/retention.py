"""Retention of the prediction log: what it has passed deleted, and labels whose prediction
never came orphaned, in bounded batches, so that a pass is bounded however far behind it is."""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import delete, exists, select, update

from service.store.schema import labels, predictions, shadow_predictions

# Rows each statement of a claim, a prune or an orphaning touches, at most.
STEP_ROWS = 1000
# Batches of one prune pass, at most.
PRUNE_STEPS = 20


def prune(engine, retention_seconds: float, on_orphaned: Callable[[int], None]) -> None:
    """Delete what the retention has passed, in bounded batches, and orphan the labels
    whose prediction never came."""
    now = time.time()
    cutoff = now - retention_seconds
    no_prediction = ~exists().where(predictions.c.request_id == labels.c.request_id)
    old_predictions = (
        select(predictions.c.request_id)
        .where(predictions.c.at < cutoff)
        .limit(STEP_ROWS)
        .with_for_update(skip_locked=True)
    )
    in_steps(
        engine,
        old_predictions,
        lambda ids: delete(predictions).where(predictions.c.request_id.in_(ids)),
    )
    shadow = shadow_predictions.c
    old_shadow = (
        select(shadow.request_id)
        .where(shadow.at < cutoff)
        .limit(STEP_ROWS)
        .with_for_update(skip_locked=True)
    )
    in_steps(
        engine,
        old_shadow,
        lambda ids: delete(shadow_predictions).where(shadow.request_id.in_(ids)),
    )
    orphans = (
        select(labels.c.request_id)
        .where(
            labels.c.orphaned_at.is_(None),
            labels.c.counted_label.is_(None),
            labels.c.received_at < cutoff,
            no_prediction,
        )
        .limit(STEP_ROWS)
        .with_for_update(of=labels, skip_locked=True)
    )
    orphaned = in_steps(
        engine,
        orphans,
        lambda ids: update(labels).where(labels.c.request_id.in_(ids)).values(orphaned_at=now),
    )
    if orphaned:
        on_orphaned(orphaned)
    old_labels = (
        select(labels.c.request_id)
        .where(
            (labels.c.orphaned_at < cutoff)
            | (
                labels.c.counted_label.is_not(None)
                & (labels.c.received_at < cutoff)
                & no_prediction
            )
        )
        .limit(STEP_ROWS)
        .with_for_update(of=labels, skip_locked=True)
    )
    in_steps(engine, old_labels, lambda ids: delete(labels).where(labels.c.request_id.in_(ids)))


def in_steps(engine, chosen, change) -> int:
    """Apply ``change(ids)`` to the rows ``chosen`` selects, a bounded batch per transaction;
    the rows changed."""
    changed = 0
    for _ in range(PRUNE_STEPS):
        with engine.begin() as connection:
            ids = list(connection.execute(chosen).scalars())
            if ids:
                connection.execute(change(ids))
        changed += len(ids)
        if len(ids) < STEP_ROWS:
            break
    return changed
