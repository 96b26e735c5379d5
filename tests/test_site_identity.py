"""A site's name belongs to the identity that first claimed it, across a resume, until the
operator unbinds it; another node claiming it is refused without ending the study, and no
history from another identity replaces or lowers a site's charges.

In process: the real StudyStrategy, READY query, ledger and run dir over a LoopbackGrid
whose nodes can change between rounds (a node leaves, another connects); the sites are
tests/fake_sites.py's, with real site ledgers.
"""

from __future__ import annotations

import json

import pytest
import torch
from fake_sites import FakeSite, fake_weights, site_app
from flwr.app import Context, Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from test_study_rounds import SHAPES, SUBJECTS, _lose_train_reply, _never_below, _study

import fedsynth.server.server_app as server_app
from fedsynth.client.budget import RoundPlan
from fedsynth.common.accountant import Segment, epsilon
from fedsynth.common.cli import main as fedsynth_main
from fedsynth.common.errors import FedsynthError
from fedsynth.common.ledger import charged, read_ledger
from fedsynth.server.privacy_ledger import (
    charge_estimate,
    charged_epsilon,
    reconcile,
    site_epsilons,
)
from fedsynth.server.site_identity import SITE_IDENTITIES, SiteNames, node_identity, unbind
from fedsynth.simulations.loopback import LoopbackGrid, task_identity

REFUSED = "node 4 claims site-{} and is refused"
KEY_A, KEY_B, KEY_C = ("key:" + c * 64 for c in "abc")  # what node_identity makes of a key


class ChangingGrid(LoopbackGrid):
    """A LoopbackGrid whose node `gone` (if any) leaves, and node `joins` connects, once
    round `at`'s train messages have been answered (plain FedAvg)."""

    def __init__(self, app, nodes, at: int, joins: int, gone: int | None = None, **kw):
        super().__init__(app, nodes, **kw)
        self.at, self.joins, self.gone = at, joins, gone

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout=timeout)
        if any(_is_train(m, self.at) for m in messages) and self.joins not in self.contexts:
            if self.gone is not None:
                del self.contexts[self.gone]
            self.contexts[self.joins] = Context(1, self.joins, {}, RecordDict(), {})
        return replies


def _is_train(message: Message, round_number: int) -> bool:
    meta = message.metadata
    return meta.message_type.startswith("train") and int(meta.group_id) == round_number


def _run(study, grid, monkeypatch) -> dict:
    class Pretrained:
        unet = torch.nn.Module()

    Pretrained.unet.state_dict = lambda: fake_weights(SHAPES)
    monkeypatch.setattr(server_app, "load_pretrained", lambda _: Pretrained)
    monkeypatch.setattr(server_app, "travelling_keys", lambda config, unet, weights: list(weights))
    with task_identity():
        return server_app.run_federation(grid, study, Context(1, 0, {}, RecordDict(), {}))


def _sites(tmp_path) -> dict[int, FakeSite]:
    return {
        n: FakeSite(n, s, SHAPES, tmp_path / "sites" / f"site-{n}") for n, s in SUBJECTS.items()
    }


def _impostor(tmp_path, sites, name: str, study) -> FakeSite:
    """Node 4 under another site's name, its own ledger forged to one cheap round 2."""
    impostor = FakeSite(4, 20, SHAPES, tmp_path / "impostor", name=name)
    spent = epsilon([Segment(8.0, 0.8, 10)], study.config.privacy.delta)
    plan = RoundPlan(8.0, 0.8, 10, study.config.privacy.delta, spent, 20)
    impostor.budget.record(
        2, plan, study=study.study_id, accountant=study.config.privacy.accountant
    )
    sites[4] = impostor
    return impostor


def _trained_at(grid, node: int) -> list:
    return [d for d in grid.deliveries if d.node_id == node and d.message_type == "train"]


def test_a_lost_reply_then_a_takeover_of_the_name_is_refused(tmp_path, monkeypatch, caplog):
    """site-2's round-2 reply is lost (the server charges an estimate) and node 2 goes
    away; node 4, started as site-2, answers READY with a forged history of one cheap
    round 2. It is refused: not picked, its history not reconciled, the estimate stays."""
    study, sites = _study(tmp_path, 4, False), _sites(tmp_path)
    _impostor(tmp_path, sites, "site-2", study)
    grid = ChangingGrid(
        site_app(sites), [1, 2, 3], at=2, joins=4, gone=2, drop=_lose_train_reply(2, {2})
    )
    summary = _run(study, grid, monkeypatch)
    ledger = read_ledger(study.run_dir / "ledger.jsonl")
    mine = [e for e in ledger if e["site"] == "site-2"]
    assert [(e["round"], e["status"]) for e in mine] == [(1, "trained"), (2, "no-reply")]
    assert summary["rounds_done"] == 4 and summary["ended_early"] is None
    assert not _trained_at(grid, 4)
    assert charged(ledger, "site-2") == mine  # the estimate still counts
    assert all(e["identity"] == "node:2" for e in mine)
    real = {n: s for n, s in sites.items() if n != 4}
    ours, theirs = _never_below(study, real, ledger)["site-2"]
    assert ours >= study.config.privacy.target_epsilon > theirs
    assert caplog.text.count(REFUSED.format(2)) == 2  # READY of rounds 3 and 4
    bindings = json.loads((study.run_dir / SITE_IDENTITIES).read_text())["bindings"]
    assert {s: b["identity"] for s, b in bindings.items()} == {
        "site-1": "node:1",
        "site-2": "node:2",
        "site-3": "node:3",
    }


def test_a_node_claiming_a_connected_sites_name_is_refused_and_the_study_goes_on(
    tmp_path, monkeypatch, caplog
):
    study, sites = _study(tmp_path, 2, False), _sites(tmp_path)
    _impostor(tmp_path, sites, "site-1", study)
    grid = ChangingGrid(site_app(sites), [1, 2, 3], at=1, joins=4)
    summary = _run(study, grid, monkeypatch)
    assert summary["rounds_done"] == 2 and summary["ended_early"] is None
    assert not _trained_at(grid, 4) and len(_trained_at(grid, 1)) == 2
    ledger = read_ledger(study.run_dir / "ledger.jsonl")
    assert not [e for e in ledger if e.get("reported_by_site")]
    assert {e["identity"] for e in ledger if e["site"] == "site-1"} == {"node:1"}
    assert caplog.text.count(REFUSED.format(1)) == 1
    _never_below(study, {n: s for n, s in sites.items() if n != 4}, ledger)


def test_two_nodes_claiming_one_unbound_name_get_neither_and_the_study_ends_cleanly(
    tmp_path, monkeypatch, caplog
):
    """One server ledger per site: a name two identities claim before it is bound goes to
    neither; with only one site left the study ends (min-sites 2) without an error."""
    study, sites = _study(tmp_path, 2, False), _sites(tmp_path)
    sites[3].name = "site-1"
    grid = LoopbackGrid(site_app(sites), list(sites))
    summary = _run(study, grid, monkeypatch)
    assert summary["rounds_done"] == 0 and "min-sites 2" in summary["ended_early"]
    assert caplog.text.count("claims site-1 and is refused") == 2
    assert "same READY" in caplog.text
    assert not (study.run_dir / "ledger.jsonl").exists()
    bindings = json.loads((study.run_dir / SITE_IDENTITIES).read_text())["bindings"]
    assert list(bindings) == ["site-2"]


def _first_study(tmp_path, monkeypatch):
    """Two rounds with sites 1-3; site-2's round-2 reply is lost (an estimate)."""
    study, sites = _study(tmp_path, 2, False), _sites(tmp_path)
    grid = LoopbackGrid(site_app(sites), list(sites), drop=_lose_train_reply(2, {2}))
    _run(study, grid, monkeypatch)
    ledger = read_ledger(study.run_dir / "ledger.jsonl")
    assert (2, "no-reply") in [(e["round"], e["status"]) for e in ledger if e["site"] == "site-2"]
    return sites


def _resume(tmp_path, monkeypatch, sites):
    """The study resumed for a third round with node 2 gone and node 4 claiming site-2."""
    resumed = _study(tmp_path, 3, False, resume=True)
    _impostor(tmp_path, sites, "site-2", resumed)
    grid = LoopbackGrid(site_app(sites), [1, 3, 4])
    summary = _run(resumed, grid, monkeypatch)
    return resumed, grid, summary, read_ledger(resumed.run_dir / "ledger.jsonl")


def test_the_binding_survives_a_resume(tmp_path, monkeypatch, caplog):
    sites = _first_study(tmp_path, monkeypatch)
    before = read_ledger(tmp_path / "run" / "ledger.jsonl")
    resumed, grid, summary, ledger = _resume(tmp_path, monkeypatch, sites)
    assert summary["rounds_done"] == 3 and not _trained_at(grid, 4)
    assert caplog.text.count(REFUSED.format(2)) == 1
    assert [e for e in ledger if e["site"] == "site-2"] == [
        e for e in before if e["site"] == "site-2"
    ]
    real = {n: s for n, s in sites.items() if n != 4}
    assert _never_below(resumed, real, ledger)["site-2"][0] >= resumed.config.privacy.target_epsilon


def test_the_operator_unbinds_a_name_and_the_old_identitys_estimate_stays(
    tmp_path, monkeypatch, caplog, capsys
):
    sites = _first_study(tmp_path, monkeypatch)
    run_dir = tmp_path / "run"
    reason = "site-2 moved to a new SuperNode key"
    assert (
        fedsynth_main(
            ["unbind-site", "--run", str(run_dir), "--site", "site-2", "--reason", reason]
        )
        == 0
    )
    assert "site-2 unbound from node:2" in caplog.text
    record = json.loads((run_dir / SITE_IDENTITIES).read_text())
    assert "site-2" not in record["bindings"]
    assert [(r["site"], r["identity"], r["by"], r["reason"]) for r in record["released"]] == [
        ("site-2", "node:2", "operator", reason)
    ]
    resumed, grid, summary, ledger = _resume(tmp_path, monkeypatch, sites)
    assert summary["rounds_done"] == 3 and "claims site-2 and is refused" not in caplog.text
    # bound now, but not picked: the server's ledger has site-2 spent (the estimate stays)
    assert not _trained_at(grid, 4)
    mine = [e for e in ledger if e["site"] == "site-2"]
    estimate = next(e for e in mine if e.get("estimate"))
    assert estimate["identity"] == "node:2"
    reported = [e for e in mine if e.get("reported_by_site")]
    assert [(e["round"], e["identity"]) for e in reported] == [(2, "node:4")]
    assert not [e for e in mine if e.get("replaces_estimate")]  # another identity's history
    assert estimate in charged(ledger, "site-2")  # the old identity's estimate still counts
    assert charged_epsilon(ledger, "site-2", resumed.config.privacy) >= (
        resumed.config.privacy.target_epsilon
    )
    again = json.loads((run_dir / SITE_IDENTITIES).read_text())["bindings"]["site-2"]
    assert again["identity"] == "node:4"
    # unbinding a name the run dir does not bind: one line, exit 1
    assert (
        fedsynth_main(["unbind-site", "--run", str(run_dir), "--site", "site-9", "--reason", "x"])
        == 1
    )
    assert "no binding for site 'site-9'" in capsys.readouterr().err


def test_only_the_estimates_own_identity_replaces_it(tmp_path):
    study = _study(tmp_path, 5, False)
    first = charge_estimate(study, 3, "site-2", identity=KEY_A)
    assert reconcile(study, "site-2", [(3, Segment(2.7, 0.8, 10))], identity=KEY_B) == 1
    ledger = read_ledger(study.run_dir / "ledger.jsonl")
    assert first in charged(ledger, "site-2")  # another identity's report only adds
    assert reconcile(study, "site-2", [(3, Segment(2.9, 0.8, 10))], identity=KEY_A) == 1
    ledger = read_ledger(study.run_dir / "ledger.jsonl")
    assert first not in charged(ledger, "site-2")
    assert ledger[-1]["replaces_estimate"] == first["estimate"]


def test_an_identity_is_its_public_key_when_the_grid_has_one():
    key = bytes(range(32))
    assert node_identity(NodeInfo(node_id=7, public_key=key)).startswith("key:")
    assert node_identity(NodeInfo(node_id=7, public_key=key)) == node_identity(
        NodeInfo(node_id=99, public_key=key)  # a re-registered key: a new node id, same site
    )
    assert node_identity(NodeInfo(node_id=7)) == "node:7"


def test_a_simulated_study_rebinds_in_a_new_flower_run_and_a_real_one_does_not(tmp_path, caplog):
    """`flwr run` simulation draws new node ids and keys every run: its bindings last one
    run, and the release is recorded. A study with real sites keeps them."""
    for simulated in (True, False):
        run_dir = tmp_path / str(simulated)
        run_dir.mkdir()
        SiteNames(run_dir, simulated).claim(1, [(11, KEY_A, "site-1")], run_id=5)
        names = SiteNames(run_dir, simulated)  # the resume: a new ServerApp
        assert names.claim(1, [(11, KEY_A, "site-1")], run_id=5) == {11}
        held = names.claim(2, [(12, KEY_B, "site-1")], run_id=6)
        record = json.loads((run_dir / SITE_IDENTITIES).read_text())
        if simulated:
            assert held == {12} and record["bindings"]["site-1"]["identity"] == KEY_B
            assert [r["by"] for r in record["released"]] == ["simulation"]
            assert [(a["from"], a["to"], a["by"]) for a in record["same_site"]] == [
                (KEY_A, KEY_B, "simulation")
            ]
        else:
            assert held == set() and record["bindings"]["site-1"]["identity"] == KEY_A
            assert record["released"] == [] and record.get("same_site", []) == []
    assert caplog.text.count("claims site-1 and is refused") == 1


def test_one_identity_speaks_for_one_name(tmp_path, caplog):
    names = SiteNames(tmp_path, False)
    assert names.claim(1, [(1, "node:1", "site-1")], run_id=1) == {1}
    assert names.claim(2, [(1, "node:1", "site-9")], run_id=1) == set()
    assert "speaks for site-1" in caplog.text and names.get(1) is None


def test_a_damaged_identities_file_is_one_line(tmp_path):
    (tmp_path / SITE_IDENTITIES).write_text("{")
    with pytest.raises(FedsynthError, match="not a readable site identities file"):
        unbind(tmp_path, "site-1", "x")


def test_a_release_refuses_an_estimate_replaced_by_another_identity(tmp_path):
    """A ledger edited so that a cheap round 2 of node:4 takes the place of node:2's
    estimate, every epsilon written to agree: the release's ledger check refuses it."""
    from fedsynth.server.finished_study import _check_line_history
    from fedsynth.server.privacy_ledger import append_line

    study = _study(tmp_path, 2, False)
    estimate = charge_estimate(study, 2, "site-2", identity="node:2")
    forged = {"reported_by_site": True, "replaces_estimate": estimate["estimate"]}
    append_line(study, 2, "site-2", Segment(50.0, 0.8, 1), "trained", identity="node:4", **forged)
    ledger = read_ledger(study.run_dir / "ledger.jsonl")
    with pytest.raises(FedsynthError, match=r"line 2: replaces estimate .* same identity"):
        _check_line_history(ledger, study.config.privacy, study.run_dir / "ledger.jsonl")
    forged_by_its_own = [ledger[0], {**ledger[1], "identity": "node:2"}]
    _check_line_history(forged_by_its_own, study.config.privacy, study.run_dir / "ledger.jsonl")


def _release_check(study) -> None:
    """What the release checks of the ledger's estimates and epsilons (finished_study)."""
    from fedsynth.server.finished_study import _check_epsilons, _check_line_history

    path = study.run_dir / "ledger.jsonl"
    ledger = read_ledger(path)
    _check_line_history(ledger, study.config.privacy, path)
    summary = {"site_epsilon": site_epsilons(ledger, study.config)}
    _check_epsilons(ledger, summary, study.config, study.run_dir)


def test_a_simulated_resume_lets_the_new_identity_replace_the_estimate(tmp_path):
    """A simulated study's sites get new keys in every Flower run: the estimate charged to
    the site in run 5 is replaced by its report in run 6 (the attested same site), so the
    site stands on the target, not above it, and the release accepts it."""
    study = _study(tmp_path, 5, False)
    SiteNames(study.run_dir, True).claim(1, [(2, KEY_A, "site-2")], run_id=5)
    charge_estimate(study, 2, "site-2", identity=KEY_A)  # its round-2 reply was lost
    assert SiteNames(study.run_dir, True).claim(3, [(7, KEY_B, "site-2")], run_id=6) == {7}
    assert reconcile(study, "site-2", [(2, Segment(2.7, 0.8, 10))], identity=KEY_B) == 1
    ledger = read_ledger(study.run_dir / "ledger.jsonl")
    assert [e.get("estimate") for e in charged(ledger, "site-2")] == [None]
    _release_check(study)


def test_a_chain_of_attestations_is_followed(tmp_path):
    study = _study(tmp_path, 5, False)
    SiteNames(study.run_dir, True).claim(1, [(2, KEY_A, "site-2")], run_id=5)
    charge_estimate(study, 2, "site-2", identity=KEY_A)
    SiteNames(study.run_dir, True).claim(3, [(7, KEY_B, "site-2")], run_id=6)
    SiteNames(study.run_dir, True).claim(3, [(9, KEY_C, "site-2")], run_id=7)
    assert reconcile(study, "site-2", [(2, Segment(2.7, 0.8, 10))], identity=KEY_C) == 1
    assert read_ledger(study.run_dir / "ledger.jsonl")[-1].get("replaces_estimate")
    _release_check(study)


def test_an_unattested_rebind_over_charges_and_the_release_says_what_to_do(tmp_path, capsys):
    """A plain unbind attests nothing: the new identity's report of the estimated round is
    added beside the estimate, the site stands above the target and the release refuses
    in one line naming the step; the operator's attestation then settles the estimate
    (one line that charges nothing) and the release accepts the study."""
    study = _study(tmp_path, 5, False)
    SiteNames(study.run_dir, False).claim(1, [(2, KEY_A, "site-2")], run_id=5)
    charge_estimate(study, 2, "site-2", identity=KEY_A)
    unbind(study.run_dir, "site-2", "SuperNode restarted")
    assert SiteNames(study.run_dir, False).claim(3, [(7, KEY_B, "site-2")], run_id=5) == {7}
    assert reconcile(study, "site-2", [(2, Segment(2.7, 0.8, 10))], identity=KEY_B) == 1
    ledger = read_ledger(study.run_dir / "ledger.jsonl")
    assert site_epsilons(ledger, study.config)["site-2"] > study.config.privacy.target_epsilon
    with pytest.raises(FedsynthError, match=f"--same-site {KEY_B}") as refused:
        _release_check(study)
    assert f"charged to {KEY_A}" in str(refused.value) and "\n" not in str(refused.value)
    argv = ["unbind-site", "--run", str(study.run_dir), "--site", "site-2", "--reason", "same"]
    assert fedsynth_main([*argv, "--same-site", KEY_B]) == 0
    ledger = read_ledger(study.run_dir / "ledger.jsonl")
    assert ledger[-1]["settles_with_line"] == 2 and ledger[-1]["steps"] == 0
    assert [e.get("estimate") for e in charged(ledger, "site-2")] == [None]
    _release_check(study)
    # the next READY settles nothing more and adds nothing
    assert reconcile(study, "site-2", [(2, Segment(2.7, 0.8, 10))], identity=KEY_B) == 0
    assert read_ledger(study.run_dir / "ledger.jsonl") == ledger


def test_the_operator_attests_a_new_key_before_it_reports(tmp_path, caplog):
    """`--same-site` on a bound name: it passes to the attested identity at once, whose
    report replaces the old identity's estimate; a key that is not an identity, or one
    that speaks for another name, is refused in one line."""
    study = _study(tmp_path, 5, False)
    names = SiteNames(study.run_dir, False)
    names.claim(1, [(2, KEY_A, "site-2"), (3, KEY_C, "site-3")], run_id=5)
    charge_estimate(study, 2, "site-2", identity=KEY_A)
    assert names.claim(3, [(7, KEY_B, "site-2")], run_id=5) == set()
    assert f"the node's identity is {KEY_B}" in caplog.text  # what the operator attests
    with pytest.raises(FedsynthError, match="not an identity"):
        unbind(study.run_dir, "site-2", "x", same_site="key:bb")
    with pytest.raises(FedsynthError, match="speaks for site-3"):
        unbind(study.run_dir, "site-2", "x", same_site=KEY_C)
    unbind(study.run_dir, "site-2", "new node key", same_site=KEY_B)
    assert names.claim(3, [(7, KEY_B, "site-2")], run_id=5) == {7}
    assert reconcile(study, "site-2", [(2, Segment(2.7, 0.8, 10))], identity=KEY_B) == 1
    _release_check(study)


def test_an_estimate_written_before_estimates_named_identities(tmp_path):
    """An estimate without `identity` counts as charged to the first identity the name was
    bound to: that identity (or its attested successor) replaces it, no other does."""
    from fedsynth.server.privacy_ledger import append_line, worst_case_segment

    study = _study(tmp_path, 5, False)
    segment = worst_case_segment([], study.config.privacy)
    append_line(study, 2, "site-2", segment, "no-reply", estimate="2-old")
    names = SiteNames(study.run_dir, False)
    names.claim(3, [(2, KEY_A, "site-2")], run_id=5)
    unbind(study.run_dir, "site-2", "another key")
    names.claim(3, [(7, KEY_B, "site-2")], run_id=5)
    assert reconcile(study, "site-2", [(2, Segment(2.7, 0.8, 10))], identity=KEY_B) == 1
    ledger = read_ledger(study.run_dir / "ledger.jsonl")
    assert "replaces_estimate" not in ledger[-1]  # KEY_B is not the first claimant
    unbind(study.run_dir, "site-2", "it was site-2 all along", same_site=KEY_B)
    _release_check(study)  # settled: KEY_B speaks for KEY_A, the first claimant


def test_a_settling_line_without_its_beside_line_is_refused(tmp_path):
    """A forged settling line (steps 0, naming a line that is not the site's report of
    the round) must not take an estimate out of the count."""
    from fedsynth.server.finished_study import _check_line_history
    from fedsynth.server.privacy_ledger import append_line

    study = _study(tmp_path, 2, False)
    estimate = charge_estimate(study, 2, "site-2", identity="node:2")
    forged = {"reported_by_site": True, "replaces_estimate": estimate["estimate"]}
    append_line(
        study, 2, "site-2", None, "trained", identity="node:2", settles_with_line=1, **forged
    )
    path = study.run_dir / "ledger.jsonl"
    with pytest.raises(FedsynthError, match=r"line 2: replaces estimate"):
        _check_line_history(read_ledger(path), study.config.privacy, path)


def test_a_run_that_says_phantoms_does_not_release_a_real_sites_binding(tmp_path):
    SiteNames(tmp_path, simulated=False).claim(1, [(11, KEY_A, "site-1")], run_id=5)
    # the study resumed once with -c data=phantoms (a coordinator's run config)
    held = SiteNames(tmp_path, simulated=True).claim(2, [(12, KEY_B, "site-1")], run_id=6)
    record = json.loads((tmp_path / SITE_IDENTITIES).read_text())
    assert held == set() and record["bindings"]["site-1"]["identity"] == KEY_A
    assert record["released"] == []


def test_a_lost_identities_file_does_not_free_a_charged_name(tmp_path):
    """The ledger charges site-2 to KEY_A and site-identities.json is gone: refused in one
    line naming the file, nothing bound."""
    study = _study(tmp_path, 5, False)
    charge_estimate(study, 1, "site-2", identity=KEY_A)
    with pytest.raises(FedsynthError, match=f"{SITE_IDENTITIES} is missing.*restore"):
        SiteNames(study.run_dir, False).claim(2, [(4, KEY_B, "site-2")], run_id=1)
    with pytest.raises(FedsynthError, match=f"{SITE_IDENTITIES} is missing"):
        unbind(study.run_dir, "site-2", "x")
    assert not (study.run_dir / SITE_IDENTITIES).exists()


@pytest.mark.parametrize(
    "binding",
    [
        {"identity": None, "run": 5, "bound": "t"},
        {"identity": [KEY_A], "run": 5, "bound": "t"},
        {"identity": 7, "run": 5, "bound": "t"},
        {"identity": "key:aa", "run": 5, "bound": "t"},
        {"identity": KEY_A, "run": "5", "bound": "t"},
        {"identity": KEY_A, "run": 5, "bound": "t", "simulated": "yes"},
    ],
)
def test_a_binding_that_is_not_one_is_one_line(tmp_path, binding):
    record = {"bindings": {"site-1": binding}, "released": []}
    (tmp_path / SITE_IDENTITIES).write_text(json.dumps(record))
    with pytest.raises(FedsynthError, match=f"{SITE_IDENTITIES}: the binding of 'site-1'"):
        SiteNames(tmp_path, simulated=False).claim(2, [(12, KEY_B, "site-1")], run_id=5)


def _round_5_line(status: str, identity: str, steps: int, **extra) -> dict:
    return {
        "round": 5,
        "site": "site-1",
        "noise_multiplier": 1.0,
        "sample_rate": 0.5 if status == "no-reply" else 0.1,
        "steps": steps,
        "delta": 1e-5,
        "epsilon": 0.0,
        "accountant": "rdp",
        "status": status,
        "identity": identity,
        **extra,
    }


def test_same_site_after_two_plain_unbinds_names_the_identity_it_succeeds(tmp_path):
    """The site trains round 5 as A (reply lost: estimate), the operator unbinds, another
    node C takes the name (estimate too), unbinds again, the site comes back as B and
    reports round 5 beside A's estimate. `--same-site B` alone could mean A or C: refused
    in one line; `--from A` settles A's estimate, and C's stays charged."""
    from fedsynth.common.ledger import append_entry

    ledger = tmp_path / "ledger.jsonl"
    names = SiteNames(tmp_path, simulated=False)
    assert names.claim(5, [(1, KEY_A, "site-1")], run_id=7) == {1}
    append_entry(ledger, _round_5_line("no-reply", KEY_A, 40, estimate="5-aaaaaaaaaaaa"))
    unbind(tmp_path, "site-1", "the site says it rotated its key")
    assert names.claim(5, [(2, KEY_C, "site-1")], run_id=7) == {2}
    append_entry(ledger, _round_5_line("no-reply", KEY_C, 40, estimate="5-cccccccccccc"))
    unbind(tmp_path, "site-1", "that was not the site")
    assert names.claim(6, [(3, KEY_B, "site-1")], run_id=7) == {3}
    append_entry(ledger, _round_5_line("trained", KEY_B, 10, reported_by_site=True))
    with pytest.raises(FedsynthError, match="needs --from OLD") as refused:
        unbind(tmp_path, "site-1", "B is the site", same_site=KEY_B)
    assert KEY_A in str(refused.value) and KEY_C in str(refused.value)
    assert "\n" not in str(refused.value)
    with pytest.raises(FedsynthError, match="--from 'key:bb'"):
        unbind(tmp_path, "site-1", "B is the site", same_site=KEY_B, same_from="key:bb")
    argv = ["unbind-site", "--run", str(tmp_path), "--site", "site-1", "--reason", "same"]
    assert fedsynth_main([*argv, "--same-site", KEY_B, "--from", KEY_A]) == 0
    still = {e.get("estimate") for e in charged(read_ledger(ledger), "site-1")}
    assert still == {"5-cccccccccccc", None}  # A's settled by B's report, C's stays
