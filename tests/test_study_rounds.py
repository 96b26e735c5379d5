"""The server's round loop with sites that drop out, run out of budget, or go quiet.

In process: the real StudyStrategy, SecAgg+/plain workflows, ledger and checkpoints over a
LoopbackGrid; the sites are small fakes that keep their own ledger history (as real sites
do, and report it) and answer fixed deltas, so aggregates can be checked exactly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp

import fedsynth.server.server_app as server_app
from fedsynth.client.client_app import secure_aggregation_when_asked
from fedsynth.common.checkpoint import AUTOENCODER, write_metadata
from fedsynth.common.config import load_config
from fedsynth.common.ledger import read_ledger
from fedsynth.server.server_app import Study
from fedsynth.simulations.loopback import LoopbackGrid, secagg_stage, task_identity

SUBJECTS = {1: 6, 2: 10, 3: 4}
WEIGHTS = {"w": torch.zeros(3, 4), "b": torch.ones(2)}
PLAN = {1: (1.1, 0.5, 2), 2: (0.9, 0.3, 2), 3: (1.3, 0.75, 2)}  # node -> sigma, rate, steps


class Site(NumPyClient):
    """Trains (a fixed delta), records the round in its own history, then replies."""

    def __init__(self, node: int, refuse_from: int | None) -> None:
        self.node, self.refuse_from = node, refuse_from
        rng = np.random.default_rng(node)
        self.delta = [rng.normal(0, 0.01, tuple(v.shape)) for v in WEIGHTS.values()]
        self.history: list[list] = []

    def fit(self, parameters, config):
        round_number = int(config["round"])
        metrics = {"site": f"site-{self.node}", "reason": "", "refused": 0, "subjects": 0}
        if self.refuse_from is not None and round_number >= self.refuse_from:
            metrics.update(refused=1, reason="spent", noise_multiplier=0.0, sample_rate=0.0,
                           steps=0, history=json.dumps(self.history))  # fmt: skip
            return [np.zeros_like(d) for d in self.delta], 0, metrics
        sigma, rate, steps = PLAN[self.node]
        self.history.append([round_number, sigma, rate, steps])
        metrics.update(noise_multiplier=sigma, sample_rate=rate, steps=steps,
                       history=json.dumps(self.history))  # fmt: skip
        return self.delta, SUBJECTS[self.node], metrics


def _federate(tmp_path, monkeypatch, secure, rounds, refuse_from=None, drop=None):
    overrides = {"federation.sites": 3, "federation.sites-per-round": 3,
                 "federation.rounds": rounds, "federation.secure-aggregation": secure}  # fmt: skip
    config = load_config("tiny", overrides)
    checkpoint = tmp_path / "pretrained"
    checkpoint.mkdir()
    (checkpoint / AUTOENCODER).write_bytes(b"not a model")
    write_metadata(checkpoint, config, latent_mean=0.0, latent_std=1.0)
    (tmp_path / "run").mkdir()
    study = Study(config, tmp_path / "run", None, checkpoint, False, 4.0, 10.0)
    sites = {n: Site(n, (refuse_from or {}).get(n)) for n in SUBJECTS}
    app = ClientApp(
        client_fn=lambda ctx: sites[ctx.node_id].to_client(), mods=[secure_aggregation_when_asked]
    )
    grid = LoopbackGrid(app, list(SUBJECTS), drop=drop)

    class Pretrained:
        unet = torch.nn.Module()

    Pretrained.unet.state_dict = lambda: {k: v.clone() for k, v in WEIGHTS.items()}
    monkeypatch.setattr(server_app, "load_pretrained", lambda _: Pretrained)
    with task_identity():
        summary = server_app.run_federation(grid, study, Context(1, 0, {}, RecordDict(), {}))
    return summary, read_ledger(study.run_dir / "ledger.jsonl"), sites, grid, study


def _weights(study: Study, r: int) -> dict[str, torch.Tensor]:
    return torch.load(study.run_dir / "rounds" / f"round-{r:03d}" / "unet.pt", weights_only=True)


def _line(ledger, r, site):
    [entry] = [e for e in ledger if e["round"] == r and e["site"] == site]
    return entry


def test_a_site_dropping_mid_secagg_round_is_charged_and_the_rest_aggregate(tmp_path, monkeypatch):
    sent = {"n": 0}

    def drop(message: Message) -> bool:
        """Node 2 vanishes in round 2 after training, before sending its masked vector."""
        if message.metadata.dst_node_id != 2:
            return False
        if secagg_stage(message) == "collect_masked_vectors":
            sent["n"] += 1
        return sent["n"] >= 2

    summary, ledger, sites, _, study = _federate(tmp_path, monkeypatch, True, 2, drop=drop)
    assert summary["rounds_done"] == 2
    assert {e["site"]: e["status"] for e in ledger if e["round"] == 2} == {
        "site-1": "trained", "site-2": "no-reply", "site-3": "trained"
    }  # fmt: skip
    # the silent site is charged with its last plan, and that matches what it really spent
    silent = _line(ledger, 2, "site-2")
    assert (silent["noise_multiplier"], silent["sample_rate"], silent["steps"]) == PLAN[2]
    assert [h[0] for h in sites[2].history] == [1, 2]
    assert silent["epsilon"] > _line(ledger, 1, "site-2")["epsilon"]
    # round 2's aggregate is the subject-weighted mean of the two that answered
    before, after = _weights(study, 1), _weights(study, 2)
    total = SUBJECTS[1] + SUBJECTS[3]
    for i, key in enumerate(WEIGHTS):
        want = (sites[1].delta[i] * SUBJECTS[1] + sites[3].delta[i] * SUBJECTS[3]) / total
        got = (after[key].double() - before[key].double()).numpy()
        assert np.abs(got - want).max() < 1e-6, key


def test_a_site_never_heard_from_is_charged_from_its_own_ledger_when_it_answers(
    tmp_path, monkeypatch
):
    lost = {"n": 0}

    def drop(message: Message) -> bool:
        """Node 3's first reply is lost (it trained); it answers from round 2 on."""
        if message.metadata.dst_node_id != 3 or not message.metadata.message_type.startswith(
            "train"
        ):
            return False
        lost["n"] += 1
        return lost["n"] == 1

    summary, ledger, _, _, _ = _federate(tmp_path, monkeypatch, False, 2, drop=drop)
    unknown = [e for e in ledger if e["round"] == 1 and e["site"].startswith("node-")]
    assert len(unknown) == 1 and unknown[0]["status"] == "no-reply" and unknown[0]["steps"] == 0
    # in round 2 site-3 reports round 1 from its own ledger: charged then, exactly once
    mine = [e for e in ledger if e["site"] == "site-3"]
    assert [(e["round"], e["status"]) for e in mine] == [(2, "trained"), (1, "no-reply")]
    assert mine[1]["reported_by_site"] is True
    assert summary["site_epsilon"]["site-3"] == pytest.approx(mine[-1]["epsilon"])
    assert mine[-1]["epsilon"] > mine[0]["epsilon"]  # two rounds' spend, not one


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secagg"])
def test_spent_sites_are_not_selected_and_the_study_ends_when_too_few_are_left(
    tmp_path, monkeypatch, secure
):
    # site-3 is out of budget from round 2; site-2 from round 3
    summary, ledger, _, _, _ = _federate(tmp_path, monkeypatch, secure, 5, refuse_from={3: 2, 2: 3})
    statuses = [(e["round"], e["site"], e["status"]) for e in ledger]
    assert (2, "site-3", "refused") in statuses and (3, "site-2", "refused") in statuses
    # a site that refused is never sent work again (every site sent work gets a line)
    assert not any(r > 2 and s == "site-3" for r, s, _ in statuses)
    assert not any(r > 3 and s == "site-2" for r, s, _ in statuses)
    if secure:  # SecAgg+ needs 2 sites: after round 3 only site-1 is left
        assert summary["rounds_done"] == 3 and "1 of 3 connected sites" in summary["ended_early"]
    else:  # site-1 trains on alone to the planned rounds
        assert summary["rounds_done"] == 5 and summary["ended_early"] is None
        assert [r for r, s, st in statuses if s == "site-1"] == [1, 2, 3, 4, 5]


def test_all_sites_spent_ends_the_study_with_no_empty_rounds(tmp_path, monkeypatch):
    summary, ledger, _, _, study = _federate(
        tmp_path, monkeypatch, False, 4, refuse_from={1: 2, 2: 2, 3: 2}
    )
    assert summary["rounds_done"] == 2 and summary["ended_early"].startswith("before round 3")
    assert max(e["round"] for e in ledger) == 2
    assert not (study.run_dir / "rounds" / "round-003").exists()
    assert json.loads((study.run_dir / "state.json").read_text())["rounds_done"] == 2


def test_a_site_epsilon_that_disagrees_with_the_server_ledger_is_flagged(tmp_path, capsys):
    from fedsynth.common.accountant import Segment, epsilon
    from fedsynth.server.server_app import _compare_reported, _ledger_line

    config = load_config("tiny")
    (tmp_path / "run").mkdir()
    study = Study(config, tmp_path / "run", None, tmp_path, False)
    _ledger_line(study, 1, "site-1", Segment(1.1, 0.5, 2), "trained")
    ours = epsilon([Segment(1.1, 0.5, 2)], config.privacy.delta)
    _compare_reported(study, "site-1", ours)
    assert capsys.readouterr().out == ""
    _compare_reported(study, "site-1", 2 * ours)
    out = capsys.readouterr().out
    assert "warning: site-1 reports epsilon" in out and "the server's figure counts" in out
