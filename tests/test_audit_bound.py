"""The one-run audit's epsilon lower bound (Steinke, Nasr & Jagielski 2023)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom

from fedsynth.simulations.audit_bound import (
    epsilon_lower_bound,
    largest_certifiable,
    p_value,
)


def test_without_delta_the_p_value_is_the_randomized_response_binomial_tail():
    q = math.exp(2.0) / (1 + math.exp(2.0))
    assert p_value(50, 40, 33, 2.0, 0.0) == pytest.approx(binom.sf(32, 40, q), rel=1e-12)


def test_all_guesses_right_gives_the_closed_form_bound():
    # P[all r right] = q^r = 0.05 at the bound: q = 0.05^(1/r), epsilon = logit(q)
    q = 0.05 ** (1 / 100)
    assert epsilon_lower_bound(100, 100, 100, 0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-6)
    assert largest_certifiable(100, 100, 0.0) == epsilon_lower_bound(100, 100, 100, 0.0)


def test_the_bound_sits_where_the_p_value_crosses_the_level():
    bound = epsilon_lower_bound(1000, 200, 170, 1e-5)
    assert (
        p_value(1000, 200, 170, bound - 1e-3, 1e-5)
        < 0.05
        <= p_value(1000, 200, 170, bound + 1e-3, 1e-5)
    )


def test_delta_and_chance_level_guessing_lower_the_bound():
    assert epsilon_lower_bound(1000, 200, 190, 1e-3) < epsilon_lower_bound(1000, 200, 190, 0.0)
    assert epsilon_lower_bound(100, 50, 25, 1e-5) == 0.0  # half right: nothing shown


def test_a_mechanism_that_meets_its_epsilon_is_refuted_at_most_at_the_error_rate():
    """Guesses right with randomized response's accuracy at epsilon 1, the most an
    epsilon-1 mechanism allows: the bound exceeds 1 in about 5% of audits, not more."""
    rng = np.random.default_rng(0)
    q = math.e / (1 + math.e)
    trials, r = 400, 200
    right = rng.binomial(r, q, size=trials)
    over = sum(epsilon_lower_bound(r, r, int(v), 0.0) > 1.0 for v in right)
    assert 0 < over / trials <= 0.08  # some audits do refute (the test hits the case)


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match="v <= r <= m"):
        p_value(10, 12, 5, 1.0, 0.0)
    with pytest.raises(ValueError, match="confidence"):
        epsilon_lower_bound(10, 10, 10, 0.0, confidence=1.0)
