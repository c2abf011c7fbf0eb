"""A paired comparison of two classifiers that stays valid however often it is looked at.

On the inputs both models answered and a label judged, only the *discordant* pairs tell them
apart: the challenger right where the champion is wrong (a win), or the reverse (a loss). If
the two are equally good, each discordant pair is a win with probability 1/2 (McNemar's null).

McNemar's test at a fixed number of labels is not valid when it is re-run every time labels
arrive: checked often enough, it crosses its line by chance. This module uses instead a
*mixture sequential probability ratio test* (Robbins's mixture martingale): the likelihood
ratio of the win rate ``p`` against 1/2, averaged over a uniform prior on ``p > 1/2`` (the
challenger better) or on ``p < 1/2`` (worse). Under the null (``p <= 1/2`` for the first), each
is a non-negative supermartingale that starts at 1, so by Ville's inequality the chance that it
*ever* reaches ``1/alpha`` is at most ``alpha``: the decision can be checked after every label.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import betainc, betaincc, betaln

PROMOTE, REJECT, WATCH = "promote", "reject", "keep watching"
# Evidence is reported up to this (a finite number for JSON; far past any threshold).
EVIDENCE_CAP = 1e12


def log_evidence(wins, losses) -> tuple[np.ndarray, np.ndarray]:
    """The log mixture likelihood ratios after ``wins`` and ``losses`` discordant pairs
    (scalars or arrays): ``(for the challenger being better, for it being worse)``.

    With the uniform prior on (1/2, 1), density 2: ``E+ = 2 * 2^n * B(w+1, l+1) * P(p > 1/2)``
    where ``P(p > 1/2)`` is the upper tail of the Beta(w+1, l+1) posterior; ``E-`` mirrors it.
    """
    wins, losses = np.asarray(wins, dtype=float), np.asarray(losses, dtype=float)
    base = math.log(2) + (wins + losses) * math.log(2) + betaln(wins + 1, losses + 1)
    with np.errstate(divide="ignore"):
        better = base + np.log(betaincc(wins + 1, losses + 1, 0.5))
        worse = base + np.log(betainc(wins + 1, losses + 1, 0.5))
    return better, worse


@dataclass(frozen=True)
class Decision:
    """Where the evidence stands after a stream of paired outcomes."""

    decision: str  # PROMOTE, REJECT or WATCH
    wins: int  # challenger right, champion wrong
    losses: int  # champion right, challenger wrong
    ties: int  # both right or both wrong
    evidence_better: float  # E+ now
    evidence_worse: float  # E- now
    decided_at: int | None  # the label after which the decision was reached (1-based)


def decide(champion_right, challenger_right, alpha: float = 0.05) -> Decision:
    """The sequential decision over paired outcomes in the order the labels came.

    The first crossing decides, and stays: ``promote`` once ``E+ >= 1/alpha``, ``reject`` once
    ``E- >= 1/alpha`` (the two cannot both cross at the level used for each; the chance that a
    challenger no better than the champion is ever promoted is at most ``alpha``).

    Args:
        champion_right, challenger_right: one boolean per labelled input, in arrival order.
        alpha: the level: the most the test may promote an equal or worse challenger.
    """
    ours, theirs = np.asarray(challenger_right, bool), np.asarray(champion_right, bool)
    wins = np.cumsum(ours & ~theirs)
    losses = np.cumsum(theirs & ~ours)
    threshold = math.log(1 / alpha)
    decision, decided_at = WATCH, None
    if len(wins):
        better, worse = log_evidence(wins, losses)
        crossings = [
            (int(np.argmax(series >= threshold)), name)
            for series, name in ((better, PROMOTE), (worse, REJECT))
            if (series >= threshold).any()
        ]
        if crossings:
            first, decision = min(crossings)
            decided_at = first + 1
        cap = math.log(EVIDENCE_CAP)
        now_better, now_worse = (float(np.exp(min(s[-1], cap))) for s in (better, worse))
    else:
        now_better = now_worse = 1.0
    n_wins, n_losses = (int(wins[-1]), int(losses[-1])) if len(wins) else (0, 0)
    return Decision(
        decision,
        n_wins,
        n_losses,
        len(ours) - n_wins - n_losses,
        round(now_better, 6),
        round(now_worse, 6),
        decided_at,
    )
