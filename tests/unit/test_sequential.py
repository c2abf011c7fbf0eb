"""The rollout's sequential test: valid however often it is checked, and quick on a clear winner.

The false-promotion rate is measured, not assumed: seeded replays of two equally good models,
the decision checked after every label."""

import math

import numpy as np
import pytest
from scipy.special import comb

from training.quality.sequential import PROMOTE, REJECT, WATCH, decide, log_evidence

ALPHA = 0.05


def test_the_evidence_is_the_mixture_likelihood_ratio():
    # By direct integration of the uniform prior on (1/2, 1), density 2, for 3 wins and 1 loss:
    # 2 * 2^4 * integral of p^3 (1 - p) from 1/2 to 1 = 32 * (1/20 - (1/64 - 1/160)) = 1.3
    better, worse = log_evidence(3, 1)
    assert math.exp(better) == pytest.approx(32 * (1 / 20 - (1 / 64 - 1 / 160)))
    # The two halves of the prior average to the ratio of the whole uniform prior.
    whole = 2**4 / (comb(4, 3) * 5)  # 1 / (n + 1) / C(n, k) over (1/2)^n
    assert (math.exp(better) + math.exp(worse)) / 2 == pytest.approx(whole)


def test_no_evidence_keeps_watching_and_ties_count_for_nothing():
    assert decide([], []).decision == WATCH
    same = decide([True, False] * 200, [True, False] * 200)
    assert (same.decision, same.wins, same.losses, same.ties) == (WATCH, 0, 0, 400)


def test_a_clear_winner_is_promoted_and_a_clear_loser_rejected_and_the_first_crossing_stays():
    better = decide([False] * 30, [True] * 30)
    assert better.decision == PROMOTE and better.decided_at <= 10
    worse = decide([True] * 30, [False] * 30)
    assert worse.decision == REJECT and worse.decided_at <= 10
    # Evidence for the challenger first, then against: the first crossing decides.
    turned = decide([False] * 10 + [True] * 200, [True] * 10 + [False] * 200)
    assert turned.decision == PROMOTE and turned.decided_at <= 10


@pytest.mark.parametrize("accuracy", [0.6, 0.9])
def test_two_equal_models_are_promoted_at_most_alpha_of_the_time_checked_after_every_label(
    accuracy,
):
    rng = np.random.default_rng(7)
    replays, labels = 1000, 2000
    promoted = 0
    for _ in range(replays):
        champion = rng.random(labels) < accuracy
        challenger = rng.random(labels) < accuracy
        promoted += decide(champion, challenger, ALPHA).decision == PROMOTE
    rate = promoted / replays
    # Ville's inequality bounds the chance of ever crossing by alpha.
    print(f"\nequal models at accuracy {accuracy}: promoted in {rate:.3f} of {replays} replays")
    assert rate <= ALPHA, rate
