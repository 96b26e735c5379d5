"""Flower SecAgg+ in the study's round loop, in process (no Ray, no SuperLink).

A loopback Grid (fedsynth.simulations.loopback) hands each message (a copy, as the wire
would) to the real ClientApp mods (site_guard, Flower's secaggplus_mod) in front of fake
sites (tests/fake_sites.py) that keep real ledgers and return fixed deltas; the server
side is the real StudyStrategy, READY query, SecAggPlusWorkflow / default fit workflow,
ledger and round checkpoints.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fake_sites import FakeSite, site_app
from flwr.app import Context, RecordDict

import fedsynth.server.server_app as server_app
from fedsynth.client.budget import RoundPlan
from fedsynth.common.checkpoint import AUTOENCODER, write_metadata
from fedsynth.common.config import load_config
from fedsynth.common.ledger import read_ledger
from fedsynth.server.secure_aggregation import secagg_settings
from fedsynth.server.strategy import StudyStrategy
from fedsynth.server.study import Study
from fedsynth.simulations.loopback import LoopbackGrid, task_identity

SUBJECTS = {1: 6, 2: 10, 3: 4}  # node id -> subjects
WEIGHTS = {
    "a.weight": torch.zeros(4, 3),
    "a.bias": torch.ones(5),
    "gate": torch.tensor(0.5),
    "count": torch.tensor(3),
}
MAX_WEIGHT = 10.0


def _study(
    tmp_path,
    secure: bool,
    rounds: int = 1,
    rate: float = 1.0,
    optimizer: str = "sgd",
    sites: int = 3,
) -> Study:
    tmp_path.mkdir(parents=True, exist_ok=True)
    overrides = {
        "federation.sites": sites,
        "federation.sites-per-round": sites,
        "federation.rounds": rounds,
        "federation.secure-aggregation": secure,
        "federation.server-learning-rate": rate,
        "privacy.batch-size": 2,
        "federation.server-optimizer": optimizer,
    }
    config = load_config("tiny", overrides)
    checkpoint = tmp_path / "pretrained"
    checkpoint.mkdir(parents=True)
    (checkpoint / AUTOENCODER).write_bytes(b"not a model")
    write_metadata(checkpoint, config, latent_mean=0.0, latent_std=1.0)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    return Study(config, run_dir, None, checkpoint, False, 4.0, MAX_WEIGHT)


def _federate(
    tmp_path,
    monkeypatch,
    secure: bool,
    spent=(),
    rate: float = 1.0,
    optimizer: str = "sgd",
    subjects: dict[int, int] = SUBJECTS,
):
    """One round of the sites `subjects` names (all of them per round); sites in `spent`
    used up their budget in an earlier study."""
    from flwr.common import parameters_to_ndarrays

    study = _study(tmp_path, secure, rate=rate, optimizer=optimizer, sites=len(subjects))
    shapes = {k: tuple(v.shape) for k, v in WEIGHTS.items()}
    folder = tmp_path / "sites"
    sites = {n: FakeSite(n, s, shapes, folder / f"site-{n}") for n, s in subjects.items()}
    for n in sites.values():  # integer buffers never move
        n.delta[list(WEIGHTS).index("count")] = np.zeros(())
    for n in spent:
        sites[n].budget.record(1, RoundPlan(0.3, 0.5, 50, 1e-5, 99.0, 4), study="earlier")
    grid = LoopbackGrid(site_app(sites), list(subjects))
    seen: list[list[np.ndarray]] = []

    class Recording(StudyStrategy):
        def aggregate_fit(self, server_round, results, failures):
            seen.extend(parameters_to_ndarrays(res.parameters) for _, res in results)
            return super().aggregate_fit(server_round, results, failures)

    class Pretrained:  # the global weights run_federation starts from
        unet = torch.nn.Module()

    Pretrained.unet.state_dict = lambda: {k: v.clone() for k, v in WEIGHTS.items()}
    monkeypatch.setattr(server_app, "StudyStrategy", Recording)
    monkeypatch.setattr(server_app, "load_pretrained", lambda _: Pretrained)
    # the fakes' weights are not a UNet: all of them travel
    monkeypatch.setattr(server_app, "travelling_keys", lambda config, unet, weights: list(weights))
    with task_identity():  # what a ServerApp process has set
        summary = server_app.run_federation(grid, study, Context(1, 0, {}, RecordDict(), {}))
    monkeypatch.undo()
    after = torch.load(study.run_dir / "rounds" / "round-001" / "unet.pt", weights_only=True)
    return after, summary, seen, grid, study, sites


def _expected(sites, trained):
    total = sum(SUBJECTS[n] for n in trained)
    return [
        sum(sites[n].delta[i] * SUBJECTS[n] / total for n in trained) for i in range(len(WEIGHTS))
    ]


def test_secagg_settings_keep_the_sum_below_the_modulus(tmp_path):
    s = secagg_settings(_study(tmp_path, True))
    assert s["reconstruction_threshold"] == 2 and s["num_shares"] == 1.0
    assert 3 * s["quantization_range"] < 2**31 and s["quantization_range"] == 2**29
    assert s["clipping_range"] == 4.0 and s["max_weight"] == MAX_WEIGHT


def test_the_reconstruction_threshold_is_never_below_min_sites(tmp_path):
    study = _study(tmp_path, True)
    config = load_config(
        "tiny", {"federation.sites": 5, "federation.sites-per-round": 5, "federation.min-sites": 4}
    )
    strict = Study(config, study.run_dir, None, study.checkpoint, False)
    assert secagg_settings(strict)["reconstruction_threshold"] == 4  # a majority would be 3


def test_a_round_with_fewer_sites_ready_states_the_quantisation_its_sites_used(
    tmp_path, monkeypatch
):
    """4 sites per round, one spent (not ready): the 3 others run SecAgg+ with the range
    for 3 sites (2**29, not the 2**28 of 4), and the round's checkpoint (what privacy.json
    states) records the range each site's secaggplus_mod quantised with."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE

    subjects = {**SUBJECTS, 4: 8}
    _, _, seen, grid, study, sites = _federate(
        tmp_path, monkeypatch, True, spent=(4,), subjects=subjects
    )
    metadata = json.loads((study.run_dir / "rounds" / "round-001" / "metadata.json").read_text())
    stated = metadata["secagg"]  # what privacy.json states for the round
    assert stated["sites"] == 3 and stated == {**secagg_settings(study, 3), "sites": 3}
    used = {n: grid.contexts[n].state.config_records[RECORD_KEY_STATE] for n in SUBJECTS}
    assert {n: u["target_range"] for n, u in used.items()} == dict.fromkeys(SUBJECTS, 2**29)
    assert {n: u["threshold"] for n, u in used.items()} == dict.fromkeys(SUBJECTS, 2)
    assert stated["quantization_range"] == 2**29 != secagg_settings(study)["quantization_range"]
    # the server's check of the unmasked aggregate used that step: the round was applied
    assert len(seen) == 3 and metadata["skipped"] is None
    expected = _expected(sites, list(SUBJECTS))
    weight = sum(SUBJECTS.values()) / MAX_WEIGHT
    for got, want in zip(seen[0], expected, strict=True):
        assert np.abs(got.reshape(np.shape(want)) - want).max() <= 3 * (8.0 / 2**29) / weight


def test_round_fit_runs_the_workflow_with_the_secagg_parameters_it_records(tmp_path, monkeypatch):
    """RoundFit sets every parameter it records for the round (strategy.secagg: the round
    checkpoint and privacy.json) on the workflow before running it, for the sites really
    ready: 3 of 4 here, whose quantisation range differs from that of 4."""
    from types import SimpleNamespace

    from flwr.app import ConfigRecord
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key

    import fedsynth.server.round_fit as round_fit
    from fedsynth.server.secure_aggregation import StudySecAggPlus

    study = _study(tmp_path, True, sites=4)
    used: dict[str, object] = {}

    class Recorded(StudySecAggPlus):  # the workflow server_app builds, recording its run
        def __call__(self, grid, context):
            used.update({name: getattr(self, name) for name in secagg_settings(study)})

    fit = Recorded(**secagg_settings(study))  # as server_app.run_federation builds it
    monkeypatch.setattr(round_fit, "wait_for_nodes", lambda grid, wanted: None)
    monkeypatch.setattr(round_fit, "ready_sites", lambda *a: [1, 2, 3])  # one not ready
    strategy = SimpleNamespace(
        over=False, done=0, study=study, names=None, study_text="", settled=1
    )
    state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({Key.CURRENT_ROUND: 1})})
    round_fit.RoundFit(fit, strategy)(SimpleNamespace(), Context(1, 0, {}, state, {}))
    assert strategy.secagg == {**used, "sites": 3}
    assert used["quantization_range"] == 2**29 != secagg_settings(study)["quantization_range"]


@pytest.mark.parametrize(
    ("spent", "rate"),
    [((), 1.0), ((2,), 1.0), ((), 3.0)],
    ids=["all-train", "one-spent", "server-rate"],
)
def test_secure_mean_equals_plain_mean_within_quantisation(tmp_path, monkeypatch, spent, rate):
    """Both paths add rate x the subject-weighted mean delta (the server learning rate
    scales the unmasked aggregate, never a site's update)."""
    plain, plain_summary, _, _, _, sites = _federate(
        tmp_path / "plain", monkeypatch, False, spent, rate
    )
    secure, secure_summary, seen, grid, study, _ = _federate(
        tmp_path / "secure", monkeypatch, True, spent, rate
    )
    trained = [n for n in SUBJECTS if n not in spent]
    expected = _expected(sites, trained)
    # a spent site is known at READY: it is never sent the round (no zero update)
    assert {d.node_id for d in grid.deliveries if d.message_type == "train"} == set(trained)
    # the unmasked aggregate (float64): below one quantisation step (2 * clip / range) per
    # site, over the summed weights subjects / max_weight
    step = 2 * 4.0 / 2**29
    weight = sum(SUBJECTS[n] for n in trained) / MAX_WEIGHT
    for got, want in zip(seen[0], expected, strict=True):
        assert np.abs(got.reshape(np.shape(want)) - want).max() <= 3 * step / weight
    tolerance = rate * 3 * step / weight + 1e-7  # saved float32 weights: + float32 rounding
    for i, key in enumerate(WEIGHTS):
        if not WEIGHTS[key].is_floating_point():
            assert torch.equal(plain[key], WEIGHTS[key]) and torch.equal(secure[key], WEIGHTS[key])
            continue
        want = WEIGHTS[key].double() + rate * torch.from_numpy(np.asarray(expected[i]))
        assert torch.allclose(plain[key].double(), want, atol=1e-7, rtol=0)
        err = (secure[key].double() - want).abs().max().item()
        assert err <= tolerance, (key, err)
        assert not torch.equal(secure[key], WEIGHTS[key])
    assert plain_summary["secure_aggregation"] is False
    assert secure_summary["secure_aggregation"] is True
    statuses = {e["site"]: e["status"] for e in read_ledger(study.run_dir / "ledger.jsonl")}
    assert statuses == {f"site-{n}": "trained" for n in trained}


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secagg+"])
def test_fedadam_moves_each_weight_by_the_rate_where_the_sites_mean_delta_points(
    tmp_path, monkeypatch, secure
):
    """federation.server-optimizer adam: the first server step is Adam's, rate x the sign
    of the mean delta (bias-corrected moments), on either path; its moments are saved in
    the round's checkpoint folder for a resume."""
    rate = 0.01
    after, _, _, _, study, sites = _federate(
        tmp_path, monkeypatch, secure, rate=rate, optimizer="adam"
    )
    expected = _expected(sites, list(SUBJECTS))
    for i, key in enumerate(WEIGHTS):
        if not WEIGHTS[key].is_floating_point():
            assert torch.equal(after[key], WEIGHTS[key])
            continue
        want = torch.from_numpy(np.asarray(np.sign(np.asarray(expected[i], np.float64)))) * rate
        moved = after[key].double() - WEIGHTS[key].double()
        assert torch.allclose(moved.reshape(want.shape), want, atol=1e-6, rtol=0), key
    assert (study.run_dir / "rounds" / "round-001" / "server_optimizer.pt").is_file()


def test_with_secure_aggregation_the_server_never_holds_a_single_sites_delta(tmp_path, monkeypatch):
    """What the server receives is masked: uniformly spread over the 2**32 modulus, so
    every masked vector holds values above the quantisation range (2**29), which no
    quantised-but-unmasked vector can (issue 16, item 2)."""
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.quantization import quantize
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    _, _, seen, grid, _, sites = _federate(tmp_path, monkeypatch, True)
    q_range = 2**29
    singles = [np.asarray(d) for s in sites.values() for d in s.delta]

    def holds_a_single(arrays) -> bool:
        return any(
            np.shape(a) == d.shape and np.allclose(a, d, atol=1e-6) for a in arrays for d in singles
        )

    assert len(seen) == 3 and all(
        np.array_equal(x, y) for s in seen[1:] for x, y in zip(seen[0], s, strict=True)
    )
    assert not holds_a_single(seen[0])
    # the check can fail: a quantised, unmasked update stays inside [0, 2**29]
    unmasked = quantize([np.asarray(d, np.float64) for d in sites[1].delta[:2]], 4.0, q_range)
    assert max(int(v.max()) for v in unmasked) <= q_range
    masked = 0
    for reply in grid.received:
        assert not reply.has_error(), reply.error
        for record in reply.content.array_records.values():
            assert len(record) == 0  # the mod cleared the parameters it masked
        configs = reply.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is not None and Key.MASKED_PARAMETERS in configs:
            vectors = [bytes_to_ndarray(b) for b in configs[Key.MASKED_PARAMETERS]]
            values = np.concatenate([v.ravel().astype(np.int64) for v in vectors])
            assert values.dtype.kind == "i" and values.size >= 20
            assert (values > q_range).mean() > 0.5  # uniform mod 2**32: about 3/4 above
            masked += 1
    assert masked == 3


def test_a_delta_beyond_the_clipping_range_or_not_finite_cannot_be_sent():
    from fedsynth.client.client_app import _unsendable

    delta = {"w": np.array([0.5, -5.0], np.float32)}
    assert "exceeds the secure aggregation clipping range 4" in _unsendable(delta, 4.0)
    assert _unsendable(delta, 0.0) == ""  # plain FedAvg: no range
    for bad in (np.nan, np.inf, -np.inf):  # nan > clip is false: checked on its own
        assert "non-finite" in _unsendable({"w": np.array([0.1, bad])}, 4.0)
        assert "non-finite" in _unsendable({"w": np.array([0.1, bad])}, 0.0)
