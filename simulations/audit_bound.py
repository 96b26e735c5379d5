"""The one-run privacy audit's epsilon lower bound (Steinke, Nasr & Jagielski, NeurIPS 2023,
"Privacy Auditing with One (1) Training Run", arXiv:2305.08846, Theorem 3.1 / Algorithm 2).

m canaries are each included in training with probability 1/2, independently. The auditor
guesses membership for r of them (abstaining on the rest) and is right v times. If the
training is (epsilon, delta)-DP, v is stochastically dominated by Binomial(r, e^eps /
(e^eps + 1)) up to a delta term, so an observed v that would be improbable under that
binomial refutes epsilon. The bound is the largest epsilon the observation refutes at the
chosen confidence: a lower bound on the true epsilon of the implementation, with that
confidence; not a proof of privacy, and loose when m is small (with r guesses all right,
the bound cannot exceed about ln(r / ln(1 / (1 - confidence))), e.g. 3.5 for r = 100 at
95%; see `largest_certifiable`).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import binom

BISECTION_STEPS = 40  # the bound to 2^-40 of its bracket


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least v of r guesses right] for an (epsilon, delta)-DP mechanism on m canaries.

    The paper's Algorithm 2 (appendix, `p_value_DP_audit`): the binomial tail at the
    randomized-response accuracy e^eps / (1 + e^eps), plus 2 m delta times the largest
    average of the tail's last i terms. Raises ValueError if not 0 <= v <= r <= m.
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if v == 0 or delta == 0:
        return min(beta, 1.0)
    tails = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, q))  # P[v > B >= v - i]
    alpha = float(np.max(tails / np.arange(1, v + 1)))
    return min(beta + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon whose p-value for (m, r, v) is below 1 - confidence (0 if none).

    Bisection on the p-value, which falls as epsilon falls (the paper's `get_eps_audit`).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    level = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < level:
        low, high = high, 2 * high
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        if p_value(m, r, v, middle, delta) < level:
            low = middle
        else:
            high = middle
    return low


def largest_certifiable(m: int, r: int, delta: float, confidence: float = 0.95) -> float:
    """The audit's power: the bound when all r guesses are right, the most it can show."""
    return epsilon_lower_bound(m, r, r, delta, confidence)
