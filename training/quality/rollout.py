"""``python -m training rollout``: should the challenger in the shadow replace the served model?

The evidence comes from the prediction log every replica writes: the champion's answers
(``predictions``), the challenger's for the same request ids (``shadow_predictions``), and the
labels that came back (``labels``). On all the shadowed inputs: how often the two agree, and how
often each says "unknown" (guard rails). On the labelled ones, in the order the labels came: the
paired outcomes, judged by a sequential test that may be checked after every label
(:mod:`training.quality.sequential`).

With ``--promote MODEL_DIR``, a challenger the evidence promotes becomes that folder's
``latest``, and every replica watching the link swaps to it without a restart
(``MODEL_WATCH_SECONDS``). A promotion or a rejection is written to ``rollout_events``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import sqlalchemy
from sqlalchemy import func, insert, select

from service.core.contract import ModelContract
from service.store.database import LogUnreadable, database_url, migrate, reading
from service.store.database import create_engine as log_engine
from service.store.schema import labels, predictions, rollout_events, shadow_predictions
from training import artifacts
from training.command_config import RolloutConfig
from training.config import ConfigError
from training.data.sources import DataError
from training.quality.monitor import parse_period
from training.quality.sequential import PROMOTE, REJECT, WATCH, decide

UNKNOWN = "unknown"


def _challenger_version(connection, since: float) -> str:
    """The challenger shadowed last, when none is named."""
    shadow = shadow_predictions.c
    latest = connection.execute(
        select(shadow.model_version).where(shadow.at >= since).order_by(shadow.at.desc()).limit(1)
    ).scalar()
    if latest is None:
        raise DataError(
            "rollout: no shadow predictions in the log for the period: set SHADOW_MODEL on the "
            "service, and let it answer some requests"
        )
    return latest


def read_evidence(config: RolloutConfig) -> dict:
    """The paired answers of the champion and the challenger, and the labels, from the log."""
    url = config.database or os.environ.get("DATABASE_URL", "")
    if not url:
        raise ConfigError("--database: name the prediction log (the service's DATABASE_URL)")
    since = time.time() - parse_period(config.since)
    shadow, champion = shadow_predictions.c, predictions.c
    try:
        migrate(log_engine(database_url(url, Path("."))))  # the shadow's tables, if none yet
    except (ValueError, sqlalchemy.exc.SQLAlchemyError) as error:
        raise DataError(f"--database {url}: {str(error).splitlines()[0]}") from None
    try:
        with reading(url) as (connection, shown_url):
            version = config.challenger or _challenger_version(connection, since)
            paired = (
                select(
                    champion.verdict,
                    champion.predicted,
                    champion.model_version,
                    shadow.verdict,
                    shadow.predicted,
                    shadow.model_name,
                    labels.c.label,
                )
                .select_from(shadow_predictions)
                .join(predictions, champion.request_id == shadow.request_id)
                .outerjoin(labels, labels.c.request_id == shadow.request_id)
                .where(shadow.model_version == version, shadow.at >= since)
                .order_by(labels.c.received_at, shadow.request_id)
            )
            rows = connection.execute(paired).all()
            events = connection.execute(select(func.count()).select_from(rollout_events)).scalar()
    except LogUnreadable as error:
        raise DataError(f"--database {error}") from None
    return {"database": shown_url, "challenger": version, "rows": rows, "events": events}


def judge(config: RolloutConfig, evidence: dict) -> dict:
    """The figures and the decision: the sequential test on the labelled pairs, and the guard
    rails on every shadowed pair."""
    rows = evidence["rows"]
    shadowed = len(rows)
    agree = sum(row[0] == row[3] for row in rows)
    labelled = [row for row in rows if row[6] is not None]
    champion_right = [row[1] == row[6] for row in labelled]
    challenger_right = [row[4] == row[6] for row in labelled]
    result = decide(champion_right, challenger_right, config.alpha)
    agreement = agree / shadowed if shadowed else None
    unknown = sum(row[3] == UNKNOWN for row in rows) / shadowed if shadowed else None
    guards = []
    if shadowed >= config.min_shadowed:
        if agreement < config.min_agreement:
            guards.append(
                f"agreement {agreement:.3f} is below --min-agreement {config.min_agreement}"
            )
        if unknown > config.max_unknown:
            guards.append(f"the challenger's unknown rate {unknown:.3f} is above --max-unknown "
                          f"{config.max_unknown}")  # fmt: skip
    decision = result.decision
    if guards:
        decision = REJECT
    elif decision == PROMOTE and shadowed < config.min_shadowed:
        decision = WATCH  # the guard rails need their inputs first
    champions = sorted({row[2] for row in rows})
    return {
        "database": evidence["database"],
        "challenger": evidence["challenger"],
        "model_name": rows[0][5] if rows else None,
        "champion_versions": champions,
        "shadowed": shadowed,
        "agreement": None if agreement is None else round(agreement, 5),
        "challenger_unknown_rate": None if unknown is None else round(unknown, 5),
        "champion_unknown_rate": round(sum(r[0] == UNKNOWN for r in rows) / shadowed, 5)
        if shadowed
        else None,
        "labelled": len(labelled),
        "champion_accuracy": round(sum(champion_right) / len(labelled), 5) if labelled else None,
        "challenger_accuracy": round(sum(challenger_right) / len(labelled), 5)
        if labelled
        else None,
        "wins": result.wins,
        "losses": result.losses,
        "ties": result.ties,
        "evidence_better": result.evidence_better,
        "evidence_worse": result.evidence_worse,
        "threshold": round(1 / config.alpha, 6),
        "decided_at_label": result.decided_at,
        "guard_rails_failed": guards,
        "decision": decision,
        "promoted": False,
    }


def promote(config: RolloutConfig, figures: dict) -> None:
    """Make the promoted challenger ``latest`` in ``--promote``'s model folder."""
    model_dir, version = Path(config.promote), figures["challenger"]
    folder = model_dir / version
    try:
        contract = ModelContract.from_metadata(json.loads((folder / "metadata.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(
            f"--promote {model_dir}: no artifact of the challenger's version {version} there "
            f"({error}); name the folder that holds the challenger's version"
        ) from None
    if contract.version != version:
        raise DataError(f"--promote {folder}: it holds version {contract.version}, not {version}")
    artifacts.point_latest(model_dir, version)
    figures["promoted"] = True


def record_event(config: RolloutConfig, figures: dict) -> None:
    """A promotion or a rejection, with its evidence, into ``rollout_events``."""
    engine = log_engine(database_url(config.database or os.environ["DATABASE_URL"], Path(".")))
    with engine.begin() as connection:
        connection.execute(
            insert(rollout_events).values(
                at=time.time(),
                model_name=figures["model_name"] or "",
                champion_version=",".join(figures["champion_versions"]),
                challenger_version=figures["challenger"],
                decision=figures["decision"],
                promoted=figures["promoted"],
                evidence={k: v for k, v in figures.items() if k != "database"},
            )
        )


def run_rollout(config: RolloutConfig) -> dict:
    """Read, judge, and with ``--promote`` act on the decision; the figures."""
    figures = judge(config, read_evidence(config))
    if figures["decision"] == PROMOTE and config.promote:
        promote(config, figures)
    if figures["decision"] in (PROMOTE, REJECT):
        record_event(config, figures)
    return figures


def format_rollout(figures: dict) -> str:
    """The evidence and the decision as the lines the command prints."""

    def shown(value, digits=".4f"):
        return "n/a" if value is None else format(value, digits)

    lines = [
        f"prediction log {figures['database']}: challenger {figures['challenger']} in the shadow "
        f"of {', '.join(figures['champion_versions']) or 'n/a'}",
        f"shadowed: {figures['shadowed']}, agreement {shown(figures['agreement'])}, unknown rate "
        f"challenger {shown(figures['challenger_unknown_rate'])}, champion "
        f"{shown(figures['champion_unknown_rate'])}",
        f"labelled: {figures['labelled']}, accuracy champion {shown(figures['champion_accuracy'])}"
        f", challenger {shown(figures['challenger_accuracy'])}",
        f"paired: challenger right where the champion was wrong {figures['wins']}, the reverse "
        f"{figures['losses']}, same {figures['ties']}",
        f"evidence (mixture sequential test): better {figures['evidence_better']:.4g}, worse "
        f"{figures['evidence_worse']:.4g}, either decides at {figures['threshold']:g}",
    ]
    lines += [f"guard rail: {guard}" for guard in figures["guard_rails_failed"]]
    at = figures["decided_at_label"]
    decision = figures["decision"] + (f" (reached at label {at})" if at else "")
    if figures["promoted"]:
        decision += f": {figures['challenger']} is now latest; the replicas swap to it"
    lines.append(f"decision: {decision}")
    return "\n".join(lines)
