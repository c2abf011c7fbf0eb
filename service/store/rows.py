"""Writing prediction rows: the dialect's multi-row insert that never replaces a logged
prediction, and on PostgreSQL the rows by COPY into a temporary table and one upsert from it."""

from __future__ import annotations

import json

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from service.store.schema import predictions, shadow_predictions


def dialect_insert(dialect: str):
    return (postgresql if dialect == "postgresql" else sqlite).insert


def upsert_statement(dialect: str):
    """The multi-row insert of prediction rows. A prediction once logged is never replaced: ids
    are unique to each answer (:mod:`service.http.request_ids`), so a row already there is the
    same answer, from a batch written again after a failure."""
    statement = dialect_insert(dialect)(predictions)
    return statement.on_conflict_do_nothing(index_elements=[predictions.c.request_id])


def shadow_insert_statement(dialect: str):
    """The multi-row insert of a challenger's rows; a row already there (a batch written again
    after a failure) is kept."""
    statement = dialect_insert(dialect)(shadow_predictions)
    return statement.on_conflict_do_nothing(
        index_elements=[shadow_predictions.c.request_id, shadow_predictions.c.model_version]
    )


_COLUMNS = [column.name for column in predictions.columns]


_STAGE = "CREATE TEMP TABLE IF NOT EXISTS prediction_batch (LIKE predictions) ON COMMIT DELETE ROWS"


_FROM_STAGE = (
    f"INSERT INTO predictions ({', '.join(_COLUMNS)}) SELECT {', '.join(_COLUMNS)} "
    "FROM prediction_batch ON CONFLICT (request_id) DO NOTHING"
)


def copy_upsert(connection: Connection, rows: list[dict]) -> None:
    """PostgreSQL: the rows by COPY into a temporary table, then one upsert from it. Measured
    (BENCHMARKS.md), COPY costs the worker a fraction of the CPU of binding each row's
    parameters, and the worker's CPU is what the requests it serves share."""
    cursor = connection.connection.driver_connection.cursor()
    try:
        cursor.execute(_STAGE)
        columns = ", ".join(_COLUMNS)
        with cursor.copy(f"COPY prediction_batch ({columns}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(
                    [json.dumps(row[name]) if name == "top_k" else row[name] for name in _COLUMNS]
                )
        cursor.execute(_FROM_STAGE)
    finally:
        cursor.close()
