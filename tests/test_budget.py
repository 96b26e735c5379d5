"""Site budgets and ledgers: planned spend lands on the target, survives restarts, refuses."""

from __future__ import annotations

import json

import pytest
from fake_sites import disclosed

from fedsynth.client.budget import BudgetRefusal, SiteBudget, sample_rate
from fedsynth.client.node_config import SiteSettings
from fedsynth.client.public_size import subject_count
from fedsynth.common.accountant import Segment, epsilon
from fedsynth.common.config import load_config
from fedsynth.common.errors import FedsynthError
from fedsynth.common.ledger import append_entry, read_ledger, spent_segments

ENTRY = {
    "round": 1,
    "site": "site-1",
    "noise_multiplier": 1.1,
    "sample_rate": 0.2,
    "steps": 10,
    "delta": 1e-5,
    "epsilon": 2.0,
    "status": "trained",
}


def study(**overrides):
    base = {
        "federation.rounds": 3,
        "privacy.local-steps": 5,
        "privacy.batch-size": 4,
        "privacy.target-epsilon": 6.0,
    }
    return load_config("tiny", base | overrides)


def run_study(budget: SiteBudget, config, subjects: int, rounds: range) -> list[float]:
    spent = []
    for r in rounds:
        plan = budget.plan_round(config, disclosed(subjects), r)
        budget.record(r, plan)
        spent.append(plan.epsilon)
    return spent


def test_ledger_round_trip_and_torn_last_line(tmp_path):
    path = tmp_path / "state" / "ledger.jsonl"
    append_entry(path, ENTRY)
    append_entry(path, ENTRY | {"round": 2, "status": "refused", "steps": 0})
    with open(path, "ab") as f:  # a crash mid-write leaves half a line
        f.write(b'{"round": 3, "site": "si')
    assert [e["round"] for e in read_ledger(path)] == [1, 2]
    append_entry(path, ENTRY | {"round": 3})
    lines = path.read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2, 3]
    assert spent_segments(read_ledger(path)) == [Segment(1.1, 0.2, 10)] * 2
    assert spent_segments(read_ledger(path), "site-2") == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json\n" + json.dumps(ENTRY) + "\n", "line 1: not a JSON ledger entry"),
        (json.dumps({k: v for k, v in ENTRY.items() if k != "epsilon"}) + "\n", "lacks epsilon"),
        (json.dumps(ENTRY | {"status": "done"}) + "\n", "status 'done' is not one of"),
    ],
)
def test_damaged_ledger_is_an_error_not_less_spend(tmp_path, content, message):
    path = tmp_path / "ledger.jsonl"
    path.write_text(content)
    with pytest.raises(FedsynthError, match=message):
        read_ledger(path)


def test_planned_rounds_land_on_the_target_and_never_above(tmp_path):
    config = study()
    budget = SiteBudget("site-1", tmp_path, max_epsilon=100.0)
    spent = run_study(budget, config, subjects=20, rounds=range(1, 4))
    assert spent == sorted(spent)
    assert 0.99 * 6.0 <= spent[-1] <= 6.0
    # the ledger alone gives the same total, recomputed with the accountant
    segments = spent_segments(read_ledger(budget.ledger_path))
    assert segments[0].sample_rate == pytest.approx(4 / 20)
    assert epsilon(segments, 1e-5) == pytest.approx(spent[-1])


def test_site_maximum_below_the_study_target_caps_the_plan(tmp_path):
    budget = SiteBudget("site-1", tmp_path, max_epsilon=2.0)
    spent = run_study(budget, study(), subjects=20, rounds=range(1, 4))
    assert 0.99 * 2.0 <= spent[-1] <= 2.0


def test_restarted_site_continues_its_spend(tmp_path):
    config = study()
    whole = run_study(SiteBudget("site-1", tmp_path / "a", 100.0), config, 20, range(1, 4))
    first = run_study(SiteBudget("site-1", tmp_path / "b", 100.0), config, 20, range(1, 3))
    # a new process: nothing but the state dir carries over
    restarted = SiteBudget("site-1", tmp_path / "b", 100.0)
    assert restarted.spent_epsilon(config.privacy) == pytest.approx(first[-1])
    rest = run_study(restarted, config, 20, range(3, 4))
    assert first + rest == pytest.approx(whole, rel=0.02)
    assert rest[-1] <= 6.0


SPENT = ENTRY | {"noise_multiplier": 0.7, "steps": 60}  # epsilon 23.9 at delta 1e-5


def test_an_exhausted_site_is_refused_from_its_ledger_before_anything_is_recorded(tmp_path):
    budget = SiteBudget("site-1", tmp_path, max_epsilon=6.0)
    append_entry(budget.ledger_path, SPENT)
    before = budget.ledger_path.read_bytes()
    with pytest.raises(BudgetRefusal, match=r"has spent epsilon 23\.9 of its 6"):
        budget.refuse_if_exhausted(study().privacy)  # what a site checks before its data
    with pytest.raises(BudgetRefusal, match=r"has spent epsilon 23\.9 of its 6"):
        budget.plan_round(study(), disclosed(20), 2)
    assert budget.ledger_path.read_bytes() == before


@pytest.mark.parametrize("spent", [False, True], ids=["below-what-rdp-certifies", "nearly-spent"])
def test_a_round_that_would_cross_even_at_the_largest_noise_is_refused_unrecorded(tmp_path, spent):
    """Budget left, but not enough for the remaining rounds at any noise the planner tries.

    Not exhausted, so this refusal comes only once the subject count (the sample rate) is
    known: after the site's data is read, before it trains or records anything.
    """
    config = study(**{"privacy.target-epsilon": 50.0})  # the site's maximum is the ceiling
    budget = SiteBudget("site-1", tmp_path, max_epsilon=0.05)  # RDP certifies ~0.1 at best
    if spent:  # or spent to within a hair of its maximum (noise 1e4 adds 1.9e-9)
        append_entry(budget.ledger_path, SPENT)
        budget.max_epsilon = epsilon(spent_segments([SPENT]), 1e-5) + 1e-9
    before = budget.ledger_path.read_bytes() if spent else b""
    budget.refuse_if_exhausted(config.privacy)  # not exhausted: the data is read
    with pytest.raises(BudgetRefusal, match=r"would cross its epsilon .* multiplier 10000 \("):
        budget.plan_round(config, disclosed(20), 2)
    assert (budget.ledger_path.read_bytes() if spent else b"") == before
    assert budget.ledger_path.exists() == spent  # nothing recorded


def test_delta_must_be_below_one_over_the_site_size(tmp_path):
    budget = SiteBudget("site-1", tmp_path, max_epsilon=10.0)
    with pytest.raises(FedsynthError, match=r"delta 0\.01 must be below 1/n"):
        budget.plan_round(study(**{"privacy.delta": 0.01}), disclosed(100), 1)


def test_a_declared_size_plans_any_delta_its_max_delta_allows_whatever_its_bucket(tmp_path):
    """A site that declares its size is checked against max-delta < 1/n alone: 1001 and
    1099 subjects publish the same 100 and both plan delta 9.9e-4 (below 1/1001), where
    a check for the top of the rounding bucket (1/1099) would refuse it for 1001 only."""
    settings = SiteSettings(
        "site-1", tmp_path, tmp_path, 10.0, max_delta=9.9e-4, public_subjects=100
    )
    config = study(**{"privacy.delta": 9.9e-4})
    for n in (1001, 1010):
        plan = SiteBudget("site-1", tmp_path / str(n), 10.0).plan_round(
            config, subject_count(settings, n), 1
        )
        assert plan.subjects == 100 and plan.delta == 9.9e-4


def test_sample_rate_from_batch_size_or_given():
    assert sample_rate(study().privacy, 20) == pytest.approx(0.2)
    assert sample_rate(study().privacy, 2) == 1.0
    given = study(**{"privacy.batch-size": None, "privacy.sample-rate": 0.3}).privacy
    assert sample_rate(given, 20) == 0.3
