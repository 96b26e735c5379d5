"""Privacy accounting for DP-SGD at one site: a thin layer over Opacus' accountants.

The math is Opacus' (RDP by default, PRV on request); this module only fixes how a
site's spend is described (a list of `Segment`s, one per run of equal settings, which is
exactly Opacus' accountant `history`) and plans the noise multiplier that lands a planned
run on a target epsilon. Anyone holding the ledger can recompute the same numbers with
plain Opacus: `RDPAccountant()`, set `.history`, `get_epsilon(delta)` (PRV: with
`eps_error=PRV_EPS_ERROR`, which is Opacus' own default).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedsynth.common.errors import FedsynthError

ACCOUNTANTS = ("rdp", "prv")

# PRV's `get_epsilon` returns the upper end of an interval of this absolute width around
# its estimate, so a PRV epsilon is never below this value and is at most this much loose.
# 0.01 is Opacus' default: a ledger recomputed with default Opacus calls gives the same
# number. (It is 1% of epsilon 1; for targets well below 1 the bound is relatively looser.)
PRV_EPS_ERROR = 0.01

# Search range for the noise multiplier. Below MIN_SIGMA epsilon is in the thousands (no
# meaningful target lives there); above MAX_SIGMA DP-SGD learns nothing. Note that with
# Opacus' RDP orders (up to 63) RDP cannot certify below ~0.103 at delta 1e-5, however
# large the noise; PRV goes down to PRV_EPS_ERROR.
MIN_SIGMA = 0.01
MAX_SIGMA = 1e4

# The planner lands in [TOLERANCE * target, target].
TOLERANCE = 0.99


@dataclass(frozen=True)
class Segment:
    """`steps` DP-SGD steps at one noise multiplier and Poisson sample rate (of subjects)."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise FedsynthError(f"accountant {accountant!r} must be one of {', '.join(ACCOUNTANTS)}")


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise FedsynthError(f"delta {delta:g} must be between 0 and 1 (exclusive)")


def _check_sample_rate(sample_rate: float) -> None:
    if not 0 < sample_rate <= 1:
        raise FedsynthError(f"sample rate {sample_rate:g} must be in (0, 1]")


def _check_segment(seg: Segment) -> None:
    _check_sample_rate(seg.sample_rate)
    if not seg.noise_multiplier > 0 or math.isinf(seg.noise_multiplier):
        raise FedsynthError(f"noise multiplier {seg.noise_multiplier:g} must be positive")
    if seg.steps < 0:
        raise FedsynthError(f"steps {seg.steps} must not be negative")


def check_delta(delta: float, subjects: int) -> None:
    """Refuse a delta that would allow leaking one of a site's `subjects` outright."""
    _check_delta(delta)
    if subjects < 1:
        raise FedsynthError(f"subjects {subjects} must be at least 1")
    if delta >= 1 / subjects:
        raise FedsynthError(
            f"delta {delta:g} must be below 1/n = {1 / subjects:.3g} "
            f"for a site of {subjects} subjects"
        )


def epsilon(history: Sequence[Segment], delta: float, accountant: str = "rdp") -> float:
    """Epsilon of all segments composed (one subject's total spend at one site)."""
    from opacus.accountants import PRVAccountant

    _check_accountant(accountant)
    _check_delta(delta)
    for seg in history:
        _check_segment(seg)
    # Zero-step segments (a refused round) spend nothing; PRV cannot compose them.
    entries = [(s.noise_multiplier, s.sample_rate, int(s.steps)) for s in history if s.steps]
    if not entries:
        return 0.0
    with warnings.catch_warnings():
        # Opacus warns when the best RDP order is at the end of its range (the bound is
        # then valid but loose) and PRV emits overflow warnings at tiny noise; neither
        # changes the number, and a CLI user cannot act on them.
        warnings.simplefilter("ignore")
        if accountant == "rdp":
            eps = _rdp_epsilon(entries, delta)
        else:
            acc = PRVAccountant()
            acc.history = entries
            eps = acc.get_epsilon(delta, eps_error=PRV_EPS_ERROR)
    return float(eps) if not math.isnan(eps) else math.inf


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(sigma: float, rate: float) -> np.ndarray:
    """Opacus' RDP of one sampled Gaussian step at its default orders (costly: cached)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    orders = RDPAccountant.DEFAULT_ALPHAS
    return np.asarray(compute_rdp(q=rate, noise_multiplier=sigma, steps=1, orders=orders))


def _rdp_epsilon(entries: list[tuple[float, float, int]], delta: float) -> float:
    """Exactly Opacus' RDPAccountant.get_epsilon (compute_rdp is its one-step RDP times
    steps), with the one-step RDP cached: ledgers repeat the same (sigma, rate) often."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = sum(_rdp_per_step(sigma, rate) * steps for sigma, rate, steps in entries)
    eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


def plan_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    spent: Sequence[Segment] = (),
) -> float:
    """Smallest noise multiplier whose run of `steps`, after `spent`, lands on the target.

    The result's epsilon (same accountant) is within 1% of `target_epsilon` and never
    above it: less noise would waste utility, more spend would break the promise.
    """
    _check_accountant(accountant)
    if not target_epsilon > 0 or math.isinf(target_epsilon):
        raise FedsynthError(f"target epsilon {target_epsilon:g} must be positive and finite")
    _check_delta(delta)
    _check_sample_rate(sample_rate)
    if steps < 1:
        raise FedsynthError(f"steps {steps} must be at least 1")
    spent = list(spent)
    already = epsilon(spent, delta, accountant)
    if already >= target_epsilon:
        raise FedsynthError(
            f"spent epsilon {already:.4g} already reaches target epsilon {target_epsilon:g}"
        )

    def eps_at(sigma: float) -> float:
        return epsilon([*spent, Segment(sigma, sample_rate, steps)], delta, accountant)

    # Bracket: eps(lo) > target >= eps(hi), expanding geometrically from sigma = 1.
    lo = hi = 1.0
    eps_lo = eps_hi = eps_at(1.0)
    if eps_hi > target_epsilon:
        while eps_hi > target_epsilon:
            if hi >= MAX_SIGMA:
                hint = "; RDP bounds go no lower, PRV may" if accountant == "rdp" else ""
                raise FedsynthError(
                    f"target epsilon {target_epsilon:g} is out of reach: even noise "
                    f"multiplier {MAX_SIGMA:g} spends {eps_hi:.4g} ({accountant}, delta "
                    f"{delta:g}, sample rate {sample_rate:g}, {steps} steps){hint}"
                )
            lo, eps_lo = hi, eps_hi
            hi = min(hi * 10, MAX_SIGMA)
            eps_hi = eps_at(hi)
    else:
        while eps_lo <= target_epsilon:
            hi, eps_hi = lo, eps_lo
            lo = lo / 2  # gently: PRV slows down sharply at large epsilon
            if lo < MIN_SIGMA:
                raise FedsynthError(
                    f"target epsilon {target_epsilon:g} is too large to plan: noise "
                    f"multiplier {MIN_SIGMA:g} already spends less"
                )
            eps_lo = eps_at(lo)

    # Shrink the bracket until eps(hi) lands in [0.99 target, target]. log(eps) is close
    # to linear in log(sigma), so interpolate there (aiming mid-band), but stay inside the
    # middle 80% of the bracket so that it always shrinks (safeguarded regula falsi).
    goal = math.log((1 + TOLERANCE) / 2 * target_epsilon)
    for _ in range(200):
        if eps_hi >= TOLERANCE * target_epsilon:
            return hi
        a, b = math.log(lo), math.log(hi)
        t = 0.5
        if math.isfinite(eps_lo) and eps_hi > 0:
            fa, fb = math.log(eps_lo), math.log(eps_hi)
            t = min(max((fa - goal) / (fa - fb), 0.1), 0.9)
        mid = math.exp(a + t * (b - a))
        if not lo < mid < hi:
            break
        eps_mid = eps_at(mid)
        if eps_mid > target_epsilon:
            lo, eps_lo = mid, eps_mid
        else:
            hi, eps_hi = mid, eps_mid
    raise FedsynthError(
        f"could not land within 1% of target epsilon {target_epsilon:g}: noise multiplier "
        f"{hi:.6g} spends {eps_hi:.4g} and slightly less noise spends more than the target"
    )
