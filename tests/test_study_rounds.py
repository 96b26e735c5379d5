"""The server's round loop with sites that drop out, go quiet, fail, or run out of budget.

In process: the real StudyStrategy, READY query, SecAgg+/plain workflows, ledger and
checkpoints over a LoopbackGrid; the sites (tests/fake_sites.py) keep real site ledgers
and re-plan their noise every round as real sites do. The invariant checked after every
scenario: the server's epsilon for each site is never below the site's own.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fake_sites import FakeSite, fake_weights, site_app
from flwr.app import Context, Message, RecordDict

import fedsynth.server.server_app as server_app
from fedsynth.common.checkpoint import AUTOENCODER, write_metadata
from fedsynth.common.config import load_config
from fedsynth.common.errors import FedsynthError
from fedsynth.common.ledger import read_ledger
from fedsynth.server.privacy_ledger import charged_epsilon
from fedsynth.server.study import Study
from fedsynth.simulations.loopback import LoopbackGrid, secagg_stage, task_identity

SUBJECTS = {1: 20, 2: 20, 3: 20}  # small sites, 16 subjects a step: q = 16/20 = 0.8
SHAPES = {"w": (3, 4), "b": (2,)}


def _study(tmp_path, rounds, secure, per_round=3, resume=False, **extra) -> Study:
    overrides = {
        "federation.sites": 3,
        "federation.sites-per-round": per_round,
        "federation.rounds": rounds,
        "federation.secure-aggregation": secure,
        "federation.min-sites": 2,
        "privacy.batch-size": 16,
        "privacy.local-steps": 10,
        # FedAvg: these tests check its arithmetic (FedAdam: test_server_optimizer)
        "federation.server-optimizer": "sgd",
        "federation.server-learning-rate": 1.0,
        **extra,
    }
    config = load_config("default", overrides)
    checkpoint = tmp_path / "pretrained"
    if not checkpoint.is_dir():
        checkpoint.mkdir()
        (checkpoint / AUTOENCODER).write_bytes(b"not a model")
        write_metadata(checkpoint, config, latent_mean=0.0, latent_std=1.0)
    (tmp_path / "run").mkdir(exist_ok=True)
    return Study(config, tmp_path / "run", None, checkpoint, resume, 4.0, 20.0)


def _sites(tmp_path) -> dict[int, FakeSite]:
    return {
        n: FakeSite(n, s, SHAPES, tmp_path / "sites" / f"site-{n}") for n, s in SUBJECTS.items()
    }


def _federate(study, sites, monkeypatch, drop=None, nodes=None):
    grid = LoopbackGrid(site_app(sites), nodes or list(sites), drop=drop)

    class Pretrained:
        unet = torch.nn.Module()

    Pretrained.unet.state_dict = lambda: fake_weights(SHAPES)
    monkeypatch.setattr(server_app, "load_pretrained", lambda _: Pretrained)
    # the fakes' weights are not a UNet: all of them travel
    monkeypatch.setattr(server_app, "travelling_keys", lambda config, unet, weights: list(weights))
    with task_identity():
        summary = server_app.run_federation(grid, study, Context(1, 0, {}, RecordDict(), {}))
    return summary, read_ledger(study.run_dir / "ledger.jsonl"), grid


def _never_below(study, sites, ledger) -> dict[str, tuple[float, float]]:
    """(server, site) epsilon per site; asserts the server's is never below the site's."""
    out = {}
    for site in sites.values():
        ours = charged_epsilon(ledger, site.name, study.config.privacy)
        theirs = site.budget.spent_epsilon(study.config.privacy, study.study_id)
        assert ours >= theirs * (1 - 1e-12), (site.name, ours, theirs)
        out[site.name] = (ours, theirs)
    return out


def _lose_train_reply(node: int, rounds: set[int], then_silent: bool = False):
    """Node's train reply is lost in `rounds` (it trained); with then_silent it answers
    nothing at all after the first of them (READY included)."""
    first = min(rounds)

    def drop(message: Message) -> bool:
        if message.metadata.dst_node_id != node:
            return False
        r = int(message.metadata.group_id)
        is_train = message.metadata.message_type.startswith("train") and secagg_stage(message) in (
            None,
            "collect_masked_vectors",
        )
        if then_silent and r > first:
            return True
        return r in rounds and is_train

    return drop


def _lines(ledger, site):
    return [
        (e["round"], e["status"], bool(e.get("estimate")), bool(e.get("replaces_estimate")))
        for e in ledger
        if e["site"] == site
    ]


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secagg"])
def test_a_lost_reply_after_a_skipped_round_is_never_undercharged(tmp_path, monkeypatch, secure):
    """Issue 12, item 1: site-2 trains round 1, sits out round 2 (2 of 3 per round), so it
    re-plans with less noise; its round-3 reply is lost. The server's estimate covers what
    it spent, and its true line replaces the estimate when it reports."""
    study, sites = _study(tmp_path, 4, secure, per_round=2), _sites(tmp_path)
    summary, ledger, _ = _federate(study, sites, monkeypatch, _lose_train_reply(2, {3}))
    rounds_of_2 = [h[0] for h in sites[2].budget.history()]
    assert rounds_of_2 == [1, 3, 4]  # the scenario happened: skipped 2, lost 3
    sigmas = [h[1] for h in sites[2].budget.history()]
    assert sigmas[1] < sigmas[0] - 0.2  # it re-planned with less noise after sitting out
    assert (3, "no-reply", True, False) in _lines(ledger, "site-2")
    assert (3, "trained", False, True) in _lines(ledger, "site-2")  # the truth replaced it
    both = _never_below(study, sites, ledger)
    ours, theirs = both["site-2"]
    assert ours == pytest.approx(theirs, rel=1e-9)  # exact once the site reported
    assert summary["site_epsilon"]["site-2"] == pytest.approx(ours)


def test_the_estimate_alone_covers_a_site_that_never_answers_again(tmp_path, monkeypatch):
    study, sites = _study(tmp_path, 4, False, per_round=2), _sites(tmp_path)
    _, ledger, _ = _federate(study, sites, monkeypatch, _lose_train_reply(2, {3}, then_silent=True))
    assert [h[0] for h in sites[2].budget.history()] == [1, 3]
    estimate = [e for e in ledger if e["site"] == "site-2" and e.get("estimate")]
    assert len(estimate) == 1 and estimate[0]["epsilon"] >= study.config.privacy.target_epsilon
    ours, theirs = _never_below(study, sites, ledger)["site-2"]
    assert ours > theirs  # conservative: the most it could have spent


def test_two_lost_replies_in_a_row(tmp_path, monkeypatch):
    study, sites = _study(tmp_path, 5, False, per_round=2), _sites(tmp_path)
    _, ledger, _ = _federate(study, sites, monkeypatch, _lose_train_reply(2, {3, 4}))
    assert [h[0] for h in sites[2].budget.history()][:3] == [1, 3, 4]
    lines = _lines(ledger, "site-2")
    assert (3, "no-reply", True, False) in lines and (4, "no-reply", True, False) in lines
    assert (3, "trained", False, True) in lines and (4, "trained", False, True) in lines
    ours, theirs = _never_below(study, sites, ledger)["site-2"]
    assert ours == pytest.approx(theirs, rel=1e-9)


def test_a_lost_reply_then_a_resume_replaces_the_estimate(tmp_path, monkeypatch):
    study, sites = _study(tmp_path, 3, False, per_round=2), _sites(tmp_path)
    _federate(study, sites, monkeypatch, _lose_train_reply(2, {3}))
    ledger = read_ledger(study.run_dir / "ledger.jsonl")
    assert (3, "no-reply", True, False) in _lines(ledger, "site-2")
    # the server stops; the study resumes for two more rounds with the same sites
    resumed = _study(tmp_path, 5, False, per_round=2, resume=True)
    summary, ledger, _ = _federate(resumed, sites, monkeypatch)
    assert summary["rounds_done"] == 5
    assert (3, "trained", False, True) in _lines(ledger, "site-2")
    for ours, theirs in _never_below(resumed, sites, ledger).values():
        assert ours == pytest.approx(theirs, rel=1e-9)


def test_a_site_dropping_mid_secagg_round_is_charged_and_the_rest_aggregate(tmp_path, monkeypatch):
    study, sites = _study(tmp_path, 2, True), _sites(tmp_path)
    seen = {"n": 0}

    def drop(message: Message) -> bool:
        """Node 2 vanishes in round 2 after training, before sending its masked vector."""
        if message.metadata.dst_node_id != 2:
            return False
        if secagg_stage(message) == "collect_masked_vectors":
            seen["n"] += 1
        return seen["n"] >= 2 and int(message.metadata.group_id) == 2

    summary, ledger, _ = _federate(study, sites, monkeypatch, drop)
    assert summary["rounds_done"] == 2
    assert {e["site"]: e["status"] for e in ledger if e["round"] == 2} == {
        "site-1": "trained",
        "site-2": "no-reply",
        "site-3": "trained",
    }
    _never_below(study, sites, ledger)
    before = torch.load(study.run_dir / "rounds" / "round-001" / "unet.pt", weights_only=True)
    after = torch.load(study.run_dir / "rounds" / "round-002" / "unet.pt", weights_only=True)
    for i, key in enumerate(SHAPES):  # the two that answered, subject-weighted
        want = (sites[1].delta[i] + sites[3].delta[i]) / 2
        got = (after[key].double() - before[key].double()).numpy()
        assert np.abs(got - want).max() < 1e-6, key


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secagg"])
def test_one_ready_site_is_never_aggregated_alone(tmp_path, monkeypatch, caplog, secure):
    """Issue 12, item 5: when the other sites will not train, no round runs and nothing is
    unmasked; the study ends saying why (federation.min-sites 2)."""
    study, sites = _study(tmp_path, 3, secure), _sites(tmp_path)
    for n in (2, 3):  # spent in an earlier study: they refuse from the first round
        sites[n].budget.record(1, _full_spend(study, SUBJECTS[n]), study="an earlier study")
    summary, ledger, grid = _federate(study, sites, monkeypatch)
    assert summary["rounds_done"] == 0 and "min-sites 2" in summary["ended_early"]
    out = caplog.text
    assert out.count("will not train: the site's privacy budget is spent") == 2
    assert not [d for d in grid.deliveries if d.message_type.startswith("train")]
    assert not ledger and not (study.run_dir / "rounds").exists()


def _full_spend(study, subjects):
    from fedsynth.client.budget import RoundPlan
    from fedsynth.common.accountant import epsilon, plan_noise

    privacy = study.config.privacy
    rate = privacy.batch_size / subjects
    sigma = plan_noise(privacy.target_epsilon, privacy.delta, rate, 50)
    from fedsynth.common.accountant import Segment

    spent = epsilon([Segment(sigma * 0.5, rate, 50)], privacy.delta)
    return RoundPlan(sigma * 0.5, rate, 50, privacy.delta, spent, subjects)


def test_a_round_with_fewer_than_min_sites_trained_is_not_aggregated(tmp_path, monkeypatch):
    """Plain FedAvg: two were sent the round, one reply lost: nothing is applied."""
    study, sites = _study(tmp_path, 1, False, per_round=2), _sites(tmp_path)
    summary, ledger, _ = _federate(study, sites, monkeypatch, _lose_train_reply(2, {1}))
    assert summary["rounds_done"] == 1
    after = torch.load(study.run_dir / "rounds" / "round-001" / "unet.pt", weights_only=True)
    assert all(float(v.abs().max()) == 0.0 for v in after.values())  # unchanged
    assert {e["site"] for e in ledger} == {"site-1", "site-2"}
    _never_below(study, sites, ledger)


def test_a_malformed_reply_does_not_break_the_round_ledger(tmp_path, monkeypatch, caplog):
    """Issue 12, item 6: one reply with an unparsable history and one with an extra metric
    are both refused before any line is written; the good site's line and the estimates
    are all there, and the round is not aggregated (1 < min-sites)."""
    study, sites = _study(tmp_path, 1, False), _sites(tmp_path)
    sites[2].metrics_override = {"history": "[[1, 2.0,"}
    sites[3].metrics_override = {"loss": 0.123}
    _, ledger, _ = _federate(study, sites, monkeypatch)
    statuses = {e["site"]: (e["status"], bool(e.get("estimate"))) for e in ledger}
    assert statuses == {
        "site-1": ("trained", False),
        "site-2": ("no-reply", True),
        "site-3": ("no-reply", True),
    }
    out = caplog.text
    assert "site-2 sent a reply the server cannot use: history" in out
    assert "site-3 sent a reply the server cannot use: metric keys differ" in out
    _never_below(study, sites, ledger)


def test_a_site_that_fails_after_spending_is_not_selected_again(tmp_path, monkeypatch, caplog):
    """Issue 12, item 7."""
    study, sites = _study(tmp_path, 3, False), _sites(tmp_path)
    sites[3].fail_after_spend = True
    _, ledger, grid = _federate(study, sites, monkeypatch)
    trained_at_3 = [d for d in grid.deliveries if d.node_id == 3 and d.message_type == "train"]
    assert len(trained_at_3) == 1  # round 1 only
    assert "site-3 will not train: the site failed in an earlier round" in caplog.text
    assert [h[0] for h in sites[3].budget.history()] == [1]
    _never_below(study, sites, ledger)


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secagg"])
def test_spent_sites_are_not_selected_and_the_study_ends_when_too_few_are_left(
    tmp_path, monkeypatch, secure
):
    study, sites = _study(tmp_path, 5, secure), _sites(tmp_path)
    sites[3].budget.record(1, _full_spend(study, SUBJECTS[3]), study="an earlier study")
    summary, ledger, _ = _federate(study, sites, monkeypatch)
    assert not [e for e in ledger if e["site"] == "site-3"]  # never sent work
    assert summary["rounds_done"] == 5  # two sites are enough for min-sites 2
    _never_below(study, sites, ledger)
    for site in ("site-1", "site-2"):
        assert summary["site_epsilon"][site] <= study.config.privacy.target_epsilon
        assert summary["site_epsilon"][site] >= 0.99 * study.config.privacy.target_epsilon


def test_a_site_epsilon_that_disagrees_with_the_server_ledger_is_flagged(tmp_path, caplog):
    from fedsynth.common.accountant import Segment, epsilon
    from fedsynth.server.privacy_ledger import append_line, compare_reported

    study = _study(tmp_path, 1, False)
    append_line(study, 1, "site-1", Segment(1.1, 0.5, 2), "trained")
    ours = epsilon([Segment(1.1, 0.5, 2)], study.config.privacy.delta)
    compare_reported(study, "site-1", ours)
    assert caplog.text == ""
    compare_reported(study, "site-1", 2 * ours)
    [record] = caplog.records
    assert record.levelname == "WARNING"
    assert "site-1 reports epsilon" in record.getMessage()
    assert "the server's figure counts" in record.getMessage()


def test_an_estimate_written_after_a_replaced_one_still_counts(tmp_path):
    """A round retried after a resume: its first estimate was replaced by the site's line,
    its second estimate (a new lost reply) must still count (review finding)."""
    from fedsynth.common.accountant import Segment
    from fedsynth.server.privacy_ledger import charge_estimate, charged, reconcile

    study = _study(tmp_path, 5, False)
    first = charge_estimate(study, 3, "site-2", identity="node:2")
    assert reconcile(study, "site-2", [(3, Segment(2.7, 0.8, 10))], identity="node:2") == 1
    second = charge_estimate(study, 3, "site-2", identity="node:2")
    ledger = read_ledger(study.run_dir / "ledger.jsonl")
    kept = [e.get("estimate") for e in charged(ledger, "site-2")]
    assert first["estimate"] not in kept and second["estimate"] in kept
    assert second["epsilon"] >= study.config.privacy.target_epsilon


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_the_worst_case_estimate_lands_on_the_target_cheaply(accountant):
    """At the target, never below it and at most ESTIMATE_TOLERANCE above (a site never
    spends past the target, so the release accepts a site there), whatever the history,
    without the accountant blowing up (PRV at sigma 0.01 needed gigabytes). The second
    history is the one whose estimate used to land at 10.43 (RDP), 10.26 (PRV)."""
    import time

    from fedsynth.common.accountant import Segment, epsilon
    from fedsynth.server.privacy_ledger import ESTIMATE_TOLERANCE, worst_case_segment

    privacy = load_config("default", {"privacy.accountant": accountant}).privacy
    target = privacy.target_epsilon
    for history in ([], [Segment(3.07, 0.8, 10)] * 4):
        start = time.monotonic()
        segment = worst_case_segment(history, privacy)
        total = epsilon([*history, segment], privacy.delta, accountant)
        assert target <= total <= target * (1 + ESTIMATE_TOLERANCE), (history, total)
        assert segment.noise_multiplier == 1.0 and 0 < segment.sample_rate <= 1
        assert time.monotonic() - start < 30
        if segment.steps > 1:  # the fewest whole steps that reach it
            fewer = Segment(1.0, 1.0, segment.steps - 1)
            assert epsilon([*history, fewer], privacy.delta, accountant) < target
    spent = [Segment(1.0, 1.0, 40)]  # already past the target: the site refuses there
    assert worst_case_segment(spent, privacy).steps == 0


@pytest.mark.parametrize(
    "override",
    [
        {"noise_multiplier": 1e-300},
        {"history": "[[" + "9" * 400 + ", 1.0, 0.5, 2]]"},
        {"history": "[" * 5000 + "]" * 5000},
        {"steps": 10**9},
    ],
    ids=["tiny-sigma", "huge-int", "deep-nesting", "absurd-steps"],
)
def test_a_hostile_reply_is_refused_before_any_line(tmp_path, monkeypatch, caplog, override):
    study, sites = _study(tmp_path, 1, False), _sites(tmp_path)
    sites[2].metrics_override = override
    _, ledger, _ = _federate(study, sites, monkeypatch)
    statuses = {e["site"]: (e["status"], bool(e.get("estimate"))) for e in ledger}
    assert statuses == {
        "site-1": ("trained", False),
        "site-2": ("no-reply", True),
        "site-3": ("trained", False),
    }
    assert "site-2 sent a reply the server cannot use" in caplog.text
    _never_below(study, sites, ledger)


def test_the_secagg_threshold_follows_the_ready_sites(tmp_path, monkeypatch):
    """sites-per-round 3 with only 2 ready: a threshold of 3 would halt the round after
    both trained; it is 2 (min-sites) and the round aggregates (review finding)."""
    study = _study(tmp_path, 1, True, per_round=3)
    config = load_config(
        "default",
        {
            "federation.sites": 3,
            "federation.sites-per-round": 3,
            "federation.rounds": 1,
            "federation.min-sites": 2,
            "federation.secure-aggregation": True,
            "privacy.batch-size": 16,
        },
    )
    assert config.federation.sites_per_round // 2 + 1 == 2  # majority of 3 is 2: force 3
    study = Study(config, study.run_dir, None, study.checkpoint, False, 4.0, 20.0)
    sites = _sites(tmp_path)
    sites[3].budget.record(1, _full_spend(study, SUBJECTS[3]), study="an earlier study")
    import fedsynth.server.round_fit as round_fit

    real = round_fit.secagg_settings

    def majority_of_all(study_, sites_=None):  # what a fixed, sites-per-round threshold was
        settings = real(study_, sites_)
        if sites_ is None:
            settings["reconstruction_threshold"] = 3
        return settings

    monkeypatch.setattr(server_app, "secagg_settings", majority_of_all)
    _, ledger, _ = _federate(study, sites, monkeypatch)
    assert {e["site"]: e["status"] for e in ledger} == {"site-1": "trained", "site-2": "trained"}
    after = torch.load(study.run_dir / "rounds" / "round-001" / "unet.pt", weights_only=True)
    assert any(float(v.abs().max()) > 0 for v in after.values())  # aggregated
    _never_below(study, sites, ledger)


def test_a_resume_whose_untrained_tensors_left_the_public_checkpoint_is_refused():
    """The sites fill in what does not travel from their public copies: a global UNet that
    differs there (a study resumed with another privacy.trainable) would have them train
    a model the server does not hold, so the server refuses it before any round."""
    from fedsynth.common.config import load_config
    from fedsynth.server.server_app import _check_frozen

    config = load_config("tiny")
    public = {"a": torch.zeros(3), "b": torch.ones(2)}
    moved = {"a": torch.full((3,), 0.1), "b": torch.ones(2)}
    _check_frozen(moved, public, ["a"], config)  # only what travels moved: fine
    with pytest.raises(FedsynthError, match=r"differs from the public checkpoint outside"):
        _check_frozen(moved, public, ["b"], config)
