"""The prediction log's tables (SQLAlchemy Core), as the latest migration leaves them.

- ``predictions``: one row per answered image, written in batches off the request path.
- ``shadow_predictions``: what a challenger run in the shadow of the served model
  (``SHADOW_MODEL``) answered for the same input, under the same request id: one row per id and
  challenger version, beside the champion's row in ``predictions``.
- ``rollout_events``: each promotion or rejection of a challenger that ``python -m training
  rollout`` decided, with its evidence.
- ``labels``: one row per request id that feedback named, whether or not its prediction has
  landed. ``counted_label`` is the label the metrics have counted for it: a label is counted by
  whichever process claims it first (the feedback request itself when the prediction is already
  there, else the writer or the sweep that finds the pair later), so the counters summed over all
  pods count each label once. ``orphaned_at`` is set when a label's wait for its prediction
  outlived the retention.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
)

metadata = MetaData()
# Ids are up to 128 characters, and an image of a batch adds "-<position>".
ID_LENGTH = 160
LABEL_LENGTH = 100

predictions = Table(
    "predictions",
    metadata,
    Column("request_id", String(ID_LENGTH), primary_key=True),
    Column("at", Float, nullable=False, index=True),  # seconds since the epoch
    Column("endpoint", String(64), nullable=False),
    Column("model_name", String(128), nullable=False),
    Column("model_version", String(128), nullable=False),
    Column("top_k", JSON, nullable=False),  # [{"label", "score"}], best first, calibrated
    Column("predicted", String(LABEL_LENGTH), nullable=False),  # the top class
    Column("verdict", String(LABEL_LENGTH), nullable=False),  # the top class, or "unknown"
    Column("score", Float, nullable=False),  # calibrated top-1 probability
    Column("ood_score", Float),  # the unknown-input score, None without a detector
    Column("input_digest", String(64), nullable=False),  # BLAKE2b-128 of the bytes sent
    Column("input_bytes", Integer, nullable=False),
    Column("captured", Boolean, nullable=False),
    Column("capture_reason", String(32)),
    Column("latency_ms", Float, nullable=False),  # decode to answer, in the service
)

shadow_predictions = Table(
    "shadow_predictions",
    metadata,
    Column("request_id", String(ID_LENGTH), primary_key=True),
    Column("model_version", String(128), primary_key=True),  # the challenger's version
    Column("at", Float, nullable=False, index=True),
    Column("model_name", String(128), nullable=False),
    Column("champion_version", String(128), nullable=False),  # the version that answered
    Column("predicted", String(LABEL_LENGTH), nullable=False),
    Column("verdict", String(LABEL_LENGTH), nullable=False),
    Column("score", Float, nullable=False),
    Column("ood_score", Float),
)

rollout_events = Table(
    "rollout_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False, index=True),
    Column("model_name", String(128), nullable=False),
    Column("champion_version", String(128), nullable=False),
    Column("challenger_version", String(128), nullable=False),
    Column("decision", String(32), nullable=False),  # promote or reject
    Column("promoted", Boolean, nullable=False),  # the challenger was made latest
    Column("evidence", JSON, nullable=False),
)

labels = Table(
    "labels",
    metadata,
    Column("request_id", String(ID_LENGTH), primary_key=True),
    Column("label", String(LABEL_LENGTH), nullable=False),  # the last one sent
    # The label names no class of the model that was serving when it came (a new class?).
    Column("new_class", Boolean, nullable=False),
    Column("first_received_at", Float, nullable=False),
    Column("received_at", Float, nullable=False, index=True),  # the last time it was sent
    Column("counted_label", String(LABEL_LENGTH)),
    Column("orphaned_at", Float),
)

# The labels a claim looks for: sent, not yet counted with their latest label, not orphaned.
UNCOUNTED = (
    (labels.c.counted_label.is_(None)) | (labels.c.counted_label != labels.c.label)
) & labels.c.orphaned_at.is_(None)
Index("labels_uncounted", labels.c.request_id, postgresql_where=UNCOUNTED, sqlite_where=UNCOUNTED)

# The capture store's ledger (one row per store, one per entry): its running total is the lock
# that every writer of every replica takes in turn, so the bound holds across replicas.
capture_usage = Table(
    "capture_usage",
    metadata,
    Column("store", String(255), primary_key=True),
    Column("bytes", BigInteger, nullable=False),
)
capture_entries = Table(
    "capture_entries",
    metadata,
    Column("store", String(255), primary_key=True),
    Column("name", String(255), primary_key=True),  # <time_ns>-<bytes>-<id>: sorts oldest first
    Column("bytes", BigInteger, nullable=False),
)
