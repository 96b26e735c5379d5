"""The planner and the accountant, checked against Google's independent dp-accounting.

Opacus computes our numbers; dp-accounting (a separate implementation) recomputes them.
RDP: both libraries use the same RDP bound for the Poisson-subsampled Gaussian and the
same RDP -> (eps, delta) conversion, so with the same orders they agree up to the
truncation of the fractional-order series, which differs slightly (seen up to 4e-4
relative at q = 0.5): we allow RDP_REL = 1e-3 relative between them.
PRV vs PLD: two different numerical methods for the same privacy loss. Opacus' PRV
returns an upper bound up to 2 * PRV_EPS_ERROR (0.02) above its estimate and PLD is
pessimistic by a discretisation of 1e-4, so the independent value must be below the
target (plus RDP_REL) and at most 0.02 under the planner's 1% band.
"""

from __future__ import annotations

import json
import logging

import dp_accounting
import pytest
from opacus.accountants import RDPAccountant

from fedsynth.common.accountant import (
    PRV_EPS_ERROR,
    Segment,
    check_delta,
    epsilon,
    plan_noise,
)
from fedsynth.common.cli import main
from fedsynth.common.errors import FedsynthError

DELTA = 1e-5
RDP_REL = 1e-3
ORDERS = RDPAccountant.DEFAULT_ALPHAS


@pytest.fixture(autouse=True)
def _quiet_dp_accounting():
    """dp-accounting logs a warning for each fractional order it skips at q = 0.5."""
    logging.disable(logging.WARNING)
    yield
    logging.disable(logging.NOTSET)


def _events(history):
    for seg in history:
        gaussian = dp_accounting.GaussianDpEvent(seg.noise_multiplier)
        yield dp_accounting.PoissonSampledDpEvent(seg.sample_rate, gaussian), seg.steps


def independent_rdp(history, delta=DELTA, orders=ORDERS) -> float:
    acc = dp_accounting.rdp.RdpAccountant(orders=orders)
    for event, count in _events(history):
        acc.compose(event, count)
    return acc.get_epsilon(delta)


def independent_pld(history, delta=DELTA) -> float:
    acc = dp_accounting.pld.PLDAccountant()
    for event, count in _events(history):
        acc.compose(event, count)
    return acc.get_epsilon(delta)


# --- the planner lands on the target, by an independent count -------------------------

RDP_CASES = [
    (1.0, 0.01, 1000),
    (1.0, 0.1, 100),
    (3.0, 0.01, 10),
    (3.0, 0.1, 1000),
    (10.0, 0.01, 100),
    (10.0, 0.5, 10),
]


@pytest.mark.parametrize(("target", "q", "steps"), RDP_CASES)
def test_rdp_plan_lands_within_one_percent_and_never_above(target, q, steps):
    sigma = plan_noise(target, DELTA, q, steps)
    history = [Segment(sigma, q, steps)]
    independent = independent_rdp(history)
    assert 0.99 * target * (1 - RDP_REL) <= independent <= target * (1 + RDP_REL)
    # dp-accounting's own default orders (more of them) can only find a tighter bound.
    assert independent_rdp(history, orders=None) <= target * (1 + RDP_REL)
    # and our own reported number is strictly inside the band
    assert 0.99 * target <= epsilon(history, DELTA) <= target


@pytest.mark.parametrize(("target", "q", "steps"), [(1.0, 0.01, 1000), (3.0, 0.1, 100)])
def test_prv_plan_agrees_with_pld(target, q, steps):
    sigma = plan_noise(target, DELTA, q, steps, accountant="prv")
    history = [Segment(sigma, q, steps)]
    assert 0.99 * target <= epsilon(history, DELTA, "prv") <= target
    independent = independent_pld(history)
    assert 0.99 * target - 2 * PRV_EPS_ERROR <= independent <= target * (1 + RDP_REL)
    # PRV is the tighter accountant: it needs less noise than RDP for the same target.
    assert sigma < plan_noise(target, DELTA, q, steps)


def test_plan_with_spent_history_counts_the_spend():
    spent = [Segment(1.0, 0.01, 300), Segment(2.0, 0.05, 200)]
    already = independent_rdp(spent)
    assert 1.0 < already < 3.0
    sigma = plan_noise(3.0, DELTA, 0.01, 500, spent=spent)
    total = independent_rdp([*spent, Segment(sigma, 0.01, 500)])
    assert 0.99 * 3.0 * (1 - RDP_REL) <= total <= 3.0 * (1 + RDP_REL)
    # a budget partly spent leaves less room: more noise for the same steps
    assert sigma > plan_noise(3.0, DELTA, 0.01, 500)


# --- epsilon() of a history is the composition of all its segments --------------------

HISTORY = [Segment(1.0, 0.01, 500), Segment(2.0, 0.1, 100), Segment(0.8, 0.02, 50)]


def test_multi_segment_epsilon_matches_independent_rdp():
    ours = epsilon(HISTORY, DELTA)
    assert ours == pytest.approx(independent_rdp(HISTORY), rel=RDP_REL)
    # every segment counts: dropping any one lowers epsilon
    for i in range(len(HISTORY)):
        assert epsilon(HISTORY[:i] + HISTORY[i + 1 :], DELTA) < ours


def test_multi_segment_epsilon_matches_independent_pld():
    ours = epsilon(HISTORY, DELTA, "prv")
    independent = independent_pld(HISTORY)
    assert independent - 1e-3 <= ours <= independent + 2 * PRV_EPS_ERROR
    assert ours < epsilon(HISTORY, DELTA)  # tighter than RDP


def test_split_segment_equals_whole_and_zero_steps_spend_nothing():
    whole = epsilon([Segment(1.2, 0.05, 400)], DELTA)
    split = epsilon([Segment(1.2, 0.05, 150), Segment(1.2, 0.05, 250)], DELTA)
    assert split == pytest.approx(whole, rel=1e-12)
    assert epsilon([], DELTA) == 0.0
    assert epsilon([Segment(1.2, 0.05, 0)], DELTA, "prv") == 0.0
    assert epsilon([Segment(1.2, 0.05, 0), Segment(1.2, 0.05, 400)], DELTA) == whole


# --- monotonicity ------------------------------------------------------------------------


def test_more_steps_need_more_noise():
    sigmas = [plan_noise(3.0, DELTA, 0.02, n) for n in (10, 100, 1000)]
    assert sigmas[0] < sigmas[1] < sigmas[2]


def test_higher_sample_rate_needs_more_noise():
    sigmas = [plan_noise(3.0, DELTA, q, 100) for q in (0.01, 0.05, 0.2)]
    assert sigmas[0] < sigmas[1] < sigmas[2]


def test_larger_target_needs_less_noise():
    sigmas = [plan_noise(eps, DELTA, 0.05, 100) for eps in (1.0, 3.0, 10.0)]
    assert sigmas[0] > sigmas[1] > sigmas[2]


# --- refusals name the value -------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"target_epsilon": 0.0}, "target epsilon 0 "),
        ({"target_epsilon": -1.0}, "target epsilon -1 "),
        ({"delta": 0.0}, "delta 0 "),
        ({"delta": 1.0}, "delta 1 "),
        ({"sample_rate": 0.0}, "sample rate 0 "),
        ({"sample_rate": 1.5}, "sample rate 1.5 "),
        ({"steps": 0}, "steps 0 "),
        ({"accountant": "gdp"}, "accountant 'gdp'"),
        ({"target_epsilon": 0.05}, "target epsilon 0.05 is out of reach"),
        ({"spent": [Segment(0.5, 0.1, 1000)]}, "already reaches target epsilon 3"),
    ],
)
def test_plan_refusals_name_the_value(kwargs, named):
    args = {"target_epsilon": 3.0, "delta": DELTA, "sample_rate": 0.01, "steps": 100}
    with pytest.raises(FedsynthError) as info:
        plan_noise(**{**args, **kwargs})
    assert named in str(info.value)
    assert "\n" not in str(info.value)


def test_check_delta_refuses_delta_at_or_above_one_over_n():
    check_delta(1e-5, 99_999)
    with pytest.raises(FedsynthError) as info:
        check_delta(1e-5, 100_000)
    assert str(info.value) == (
        "delta 1e-05 must be below 1/n = 1e-05 for a site of 100000 subjects"
    )
    with pytest.raises(FedsynthError) as info:
        check_delta(0.01, 200)
    assert "delta 0.01 must be below 1/n = 0.005 " in str(info.value)


def test_epsilon_refuses_a_bad_history():
    with pytest.raises(FedsynthError, match="noise multiplier 0 must be positive"):
        epsilon([Segment(0.0, 0.1, 10)], DELTA)
    with pytest.raises(FedsynthError, match="sample rate 2 must be in"):
        epsilon([Segment(1.0, 2.0, 10)], DELTA)


# --- the CLI ------------------------------------------------------------------------------

PLAN = ["privacy", "plan", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "1000"]


def test_cli_plan_json(capsys):
    assert main([*PLAN, "--epsilon", "3", "--subjects", "1000", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    keys = {"noise_multiplier", "epsilon", "delta", "sample_rate", "steps", "accountant"}
    assert keys <= set(out)
    assert out["accountant"] == "rdp" and out["steps"] == 1000 and out["delta"] == 1e-5
    assert 0.99 * 3 <= out["epsilon"] <= 3
    history = [Segment(out["noise_multiplier"], 0.01, 1000)]
    assert independent_rdp(history) == pytest.approx(out["epsilon"], rel=RDP_REL)


def test_cli_plan_readable_line(capsys):
    assert main([*PLAN, "--epsilon", "3", "--accountant", "prv"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert out.startswith("noise multiplier ") and "prv" in out


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--epsilon", "3", "--subjects", "100000"], "delta 1e-05 must be below 1/n"),
        (["--epsilon", "0"], "target epsilon 0 "),
        (["--epsilon", "3", "--steps", "0"], "steps 0 "),
    ],
)
def test_cli_error_is_one_line(capsys, extra, named):
    assert main([*PLAN, *extra]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("fedsynth privacy: error: ")
    assert named in lines[0]
    assert "Traceback" not in captured.err
