"""SecAgg+ rounds where sites vanish at each stage, and the halted path (too few left).

In process over a LoopbackGrid (simulations/loopback.py) with the fake sites of
tests/fake_sites.py, which keep real site ledgers. Flower's SecAggPlusWorkflow trains only
at its collect-masked-vectors stage: a site that vanishes at setup or share-keys never
gets the weights, one that vanishes at unmask has trained and its masked vector is in
the sum. With 3 sites the reconstruction threshold is 2, so losing 2 halts the round;
RoundFit then still writes the round's ledger lines and its (unchanged) checkpoint.
After every scenario: the server's epsilon is never below a site's own.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.app import Message
from test_study_rounds import SHAPES, _federate, _lines, _never_below, _sites, _study

from fedsynth.simulations.loopback import drop_at

Drop = Callable[[Message], bool]


def _any(*drops: Drop) -> Drop:
    return lambda message: any(drop(message) for drop in drops)


def _in_round(round_number: int, drop: Drop) -> Drop:
    """`drop`, in one round only: the site is back (and answers READY) the round after."""
    return lambda message: int(message.metadata.group_id) == round_number and drop(message)


def _weights(study, round_number: int) -> dict[str, np.ndarray]:
    path = study.run_dir / "rounds" / f"round-{round_number:03d}" / "unet.pt"
    return {k: v.double().numpy() for k, v in torch.load(path, weights_only=True).items()}


def _zeros() -> dict[str, np.ndarray]:
    """The fake pretrained weights every study starts from."""
    return {k: np.zeros(s) for k, s in SHAPES.items()}


def _trained(sites) -> dict[str, list[int]]:
    """The rounds each site's own ledger says it trained."""
    return {s.name: [int(h[0]) for h in s.budget.history()] for s in sites.values()}


def _answered(grid, node: int) -> list[str | None]:
    """The SecAgg+ stages (None: READY or plain) of the messages `node` answered."""
    return [d.stage for d in grid.deliveries if d.node_id == node and d.replied]


def _moved_by(before, after, sites, nodes) -> None:
    """after - before is the subject-weighted mean (equal subjects) of `nodes`' deltas."""
    for i, key in enumerate(SHAPES):
        want = sum((sites[n].delta[i] for n in nodes), np.zeros(SHAPES[key])) / max(len(nodes), 1)
        assert np.abs(after[key] - before[key] - want).max() < 1e-6, key


def test_a_round_halted_at_unmask_charges_estimates_applies_nothing_and_goes_on(
    tmp_path, monkeypatch, caplog
):
    """Round 2: all three train, then two vanish at unmask: one share per secret is below
    the threshold (2), Flower halts. The round is charged (estimates), its checkpoint holds
    the round-1 weights, and round 3 runs: the sites report round 2 and their true lines
    replace the estimates."""
    study, sites = _study(tmp_path, 3, True), _sites(tmp_path)
    drop = _in_round(2, _any(drop_at(2, "unmask"), drop_at(3, "unmask")))
    summary, ledger, grid = _federate(study, sites, monkeypatch, drop)
    out = caplog.text
    assert "round 2: aggregation halted" in out
    assert "round 2 not aggregated: only 0 site(s) trained" in out
    assert _trained(sites) == {f"site-{n}": [1, 2, 3] for n in (1, 2, 3)}
    unmask = sorted((d.node_id, d.replied) for d in grid.deliveries if d.stage == "unmask")
    assert (
        unmask == [(1, True)] * 3 + [(2, False)] + [(2, True)] * 2 + [(3, False)] + [(3, True)] * 2
    )  # rounds 1-3: sites 2 and 3 unheard once (round 2)
    for site in sites.values():  # trained in round 2, not heard: estimate, then the truth
        lines = _lines(ledger, site.name)
        assert (2, "no-reply", True, False) in lines, lines
        assert [line for line in lines if line[0] == 2 and not line[2]] == [
            (2, "trained", False, True)
        ]  # charged exactly once once the estimate is replaced
    # a halted round applies nothing; the rounds around it do
    _moved_by(_weights(study, 1), _weights(study, 2), sites, [])
    _moved_by(_weights(study, 2), _weights(study, 3), sites, [1, 2, 3])
    assert summary["rounds_done"] == 3 and summary["ended_early"] is None
    for ours, theirs in _never_below(study, sites, ledger).values():
        assert ours == pytest.approx(theirs, rel=1e-9)  # exact again once reported


def test_two_of_three_vanishing_after_setup_halt_before_anyone_trains(
    tmp_path, monkeypatch, caplog
):
    """Sites 2 and 3 answer setup, then never again: the share-keys stage leaves one site,
    Flower halts before any site is sent the weights. Nothing is applied, nobody has spent,
    and with one site left the study ends (federation.min-sites 2)."""
    study, sites = _study(tmp_path, 3, True), _sites(tmp_path)
    drop = _any(drop_at(2, "share_keys"), drop_at(3, "share_keys"))
    summary, ledger, grid = _federate(study, sites, monkeypatch, drop)
    assert "round 1: aggregation halted" in caplog.text
    assert not [d for d in grid.deliveries if d.stage == "collect_masked_vectors"]
    assert _trained(sites) == {"site-1": [], "site-2": [], "site-3": []}
    # the server cannot tell; it may charge an estimate, never a trained line
    assert {e["round"] for e in ledger} <= {1}
    assert all(e["status"] == "no-reply" and e["estimate"] for e in ledger), ledger
    _moved_by(_zeros(), _weights(study, 1), sites, [])
    assert summary["rounds_done"] == 1
    assert "before round 2" in summary["ended_early"]
    assert "min-sites 2" in summary["ended_early"]
    _never_below(study, sites, ledger)


def test_a_site_vanishing_at_share_keys_leaves_the_others_round_whole(
    tmp_path, monkeypatch, caplog
):
    """Site 2 drops at share-keys in round 1 and stays away. Flower 1.41's workflow would
    list it as dead at unmask, where the others hold no share of its key (a KeyError in
    secaggplus_mod._unmask) and the round would halt after sites 1 and 3 trained;
    StudySecAggPlus leaves it out, so round 1 aggregates sites 1 and 3. Site 2 never got
    the weights and is not charged. Rounds 2 and 3 run with sites 1 and 3 (threshold 2)."""
    study, sites = _study(tmp_path, 3, True), _sites(tmp_path)
    summary, ledger, grid = _federate(study, sites, monkeypatch, drop_at(2, "share_keys"))
    assert "aggregation halted" not in caplog.text
    assert "round 1/3: 2 trained, 0 no valid reply" in caplog.text  # the log was seen
    assert _answered(grid, 2) == [None, "setup"]  # READY and setup of round 1, then nothing
    assert "collect_masked_vectors" not in [d.stage for d in grid.deliveries if d.node_id == 2]
    assert _trained(sites) == {"site-1": [1, 2, 3], "site-2": [], "site-3": [1, 2, 3]}
    for site in ("site-1", "site-3"):
        assert [line for line in _lines(ledger, site) if line[0] == 1] == [
            (1, "trained", False, False)
        ]
    assert not [e for e in ledger if e["site"] == "site-2"]  # never sent the weights
    _moved_by(_zeros(), _weights(study, 1), sites, [1, 3])
    _moved_by(_weights(study, 1), _weights(study, 2), sites, [1, 3])
    assert summary["rounds_done"] == 3 and summary["ended_early"] is None
    both = _never_below(study, sites, ledger)
    for site in ("site-1", "site-3"):
        assert both[site][0] == pytest.approx(both[site][1], rel=1e-9)


def test_a_site_vanishing_at_unmask_is_in_the_sum_and_charged_as_trained(tmp_path, monkeypatch):
    """Site 2 trains round 1 and vanishes at unmask: the others' shares remove its mask,
    so its update is in the round's sum and its reply (from the masked-vector stage) is
    charged as trained; round 2 runs without it."""
    study, sites = _study(tmp_path, 2, True), _sites(tmp_path)
    summary, ledger, grid = _federate(study, sites, monkeypatch, drop_at(2, "unmask"))
    unmask = [(d.node_id, d.replied) for d in grid.deliveries if d.stage == "unmask"]
    assert sorted(unmask) == [(1, True), (1, True), (2, False), (3, True), (3, True)]
    assert _trained(sites) == {"site-1": [1, 2], "site-2": [1], "site-3": [1, 2]}
    for n in (1, 3):
        assert _lines(ledger, f"site-{n}")[0] == (1, "trained", False, False)
    assert _lines(ledger, "site-2") == [(1, "trained", False, False)]  # no estimate, once
    _moved_by(_zeros(), _weights(study, 1), sites, [1, 2, 3])
    _moved_by(_weights(study, 1), _weights(study, 2), sites, [1, 3])
    assert summary["rounds_done"] == 2 and summary["ended_early"] is None
    for ours, theirs in _never_below(study, sites, ledger).values():
        assert ours == pytest.approx(theirs, rel=1e-9)
