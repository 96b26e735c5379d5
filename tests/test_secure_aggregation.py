"""Flower SecAgg+ in the study's round loop, in process (no Ray, no SuperLink).

A loopback Grid (fedsynth.simulations.loopback) hands each message (a copy, as the wire
would) to the real ClientApp mod (`secure_aggregation_when_asked`, i.e. Flower's
secaggplus_mod) in front of fake sites that return fixed deltas, and the server side is
the real StudyStrategy with the real SecAggPlusWorkflow / default fit workflow, ledger and
round checkpoints.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp

from fedsynth.client.client_app import secure_aggregation_when_asked
from fedsynth.common.checkpoint import AUTOENCODER, write_metadata
from fedsynth.common.config import load_config
from fedsynth.common.ledger import read_ledger
from fedsynth.server.server_app import Study, StudyStrategy, run_federation, secagg_settings
from fedsynth.simulations.loopback import LoopbackGrid, task_identity

SUBJECTS = {1: 6, 2: 10, 3: 4}  # node id -> subjects


def _deltas(seed: int, keys_shapes: dict[str, tuple[int, ...]]) -> dict[int, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {
        n: [rng.normal(0, 0.01, s).astype(np.float32) for s in keys_shapes.values()]
        for n in SUBJECTS
    }


class FakeSite(NumPyClient):
    def __init__(self, node: int, delta: list[np.ndarray], refuse: bool) -> None:
        self.node, self.delta, self.refuse = node, delta, refuse

    def fit(self, parameters, config):
        metrics = {"site": f"site-{self.node}", "reason": "", "refused": 0,
                   "noise_multiplier": 1.0, "sample_rate": 0.5, "steps": 2}  # fmt: skip
        if self.refuse:
            metrics.update(refused=1, steps=0, reason="spent")
            return [np.zeros_like(d) for d in self.delta], 0, metrics
        return self.delta, SUBJECTS[self.node], metrics


def _study(tmp_path, secure: bool, rounds: int = 1) -> Study:
    tmp_path.mkdir(parents=True, exist_ok=True)
    overrides = {"federation.sites": 3, "federation.sites-per-round": 3,
                 "federation.rounds": rounds, "federation.secure-aggregation": secure}  # fmt: skip
    config = load_config("tiny", overrides)
    checkpoint = tmp_path / "pretrained"
    checkpoint.mkdir(parents=True)
    (checkpoint / AUTOENCODER).write_bytes(b"not a model")
    write_metadata(checkpoint, config, latent_mean=0.0, latent_std=1.0)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    return Study(config, run_dir, tmp_path / "phantoms", checkpoint, False, 4.0, 10.0)


WEIGHTS = {"a.weight": torch.zeros(4, 3), "a.bias": torch.ones(5), "gate": torch.tensor(0.5),
           "count": torch.tensor(3)}  # fmt: skip


def _federate(tmp_path, monkeypatch, secure: bool, deltas, weights, refuse=()):
    from flwr.common import parameters_to_ndarrays

    import fedsynth.server.server_app as server_app

    study = _study(tmp_path, secure)
    sites = {n: FakeSite(n, deltas[n], n in refuse) for n in SUBJECTS}
    app = ClientApp(
        client_fn=lambda ctx: sites[ctx.node_id].to_client(),
        mods=[secure_aggregation_when_asked],
    )
    grid = LoopbackGrid(app, list(SUBJECTS))
    seen: list[list[np.ndarray]] = []

    class Recording(StudyStrategy):
        def aggregate_fit(self, server_round, results, failures):
            seen.extend(parameters_to_ndarrays(res.parameters) for _, res in results)
            return super().aggregate_fit(server_round, results, failures)

    class Pretrained:  # the global weights run_federation starts from
        unet = torch.nn.Module()

    Pretrained.unet.state_dict = lambda: {k: v.clone() for k, v in weights.items()}
    monkeypatch.setattr(server_app, "StudyStrategy", Recording)
    monkeypatch.setattr(server_app, "load_pretrained", lambda _: Pretrained)
    with task_identity():  # what a ServerApp process has set
        summary = run_federation(grid, study, Context(1, 0, {}, RecordDict(), {}))
    monkeypatch.undo()
    after = torch.load(study.run_dir / "rounds" / "round-001" / "unet.pt", weights_only=True)
    return after, summary, seen, grid, study


def _expected(deltas, trained):
    total = sum(SUBJECTS[n] for n in trained)
    return [sum(deltas[n][i].astype(np.float64) * SUBJECTS[n] / total for n in trained)
            for i in range(len(WEIGHTS))]  # fmt: skip


def test_secagg_settings_keep_the_sum_below_the_modulus(tmp_path):
    s = secagg_settings(_study(tmp_path, True))
    assert s["reconstruction_threshold"] == 2 and s["num_shares"] == 1.0
    assert 3 * s["quantization_range"] < 2**32 and s["quantization_range"] == 2**30
    assert s["clipping_range"] == 4.0 and s["max_weight"] == 10.0


@pytest.mark.parametrize("refuse", [(), (2,)], ids=["all-train", "one-refuses"])
def test_secure_mean_equals_plain_mean_within_quantisation(tmp_path, monkeypatch, refuse):
    shapes = {k: tuple(v.shape) for k, v in WEIGHTS.items()}
    deltas = _deltas(7, shapes)
    deltas = {n: [d if k != "count" else np.zeros(s, np.int64) for (k, s), d in
                  zip(shapes.items(), ds, strict=True)] for n, ds in deltas.items()}  # fmt: skip
    plain, plain_summary, _, _, _ = _federate(
        tmp_path / "plain", monkeypatch, False, deltas, WEIGHTS, refuse
    )
    secure, secure_summary, seen, _, study = _federate(
        tmp_path / "secure", monkeypatch, True, deltas, WEIGHTS, refuse
    )
    trained = [n for n in SUBJECTS if n not in refuse]
    expected = _expected(deltas, trained)
    # the unmasked aggregate (float64): below one quantisation step (2 * clip / range) per
    # site, over the summed weights subjects / max_weight (2.0, or 1.0 with site 2 out)
    step = 2 * 4.0 / 2**30
    weight = sum(SUBJECTS[n] for n in trained) / 10.0
    for got, want in zip(seen[0], expected, strict=True):
        assert np.abs(got.reshape(want.shape) - want).max() <= 3 * step / weight
    # the saved float32 weights: plus float32 rounding (~6e-8 near 1.0)
    tolerance = 3 * step / weight + 1e-7
    for i, key in enumerate(WEIGHTS):
        if not WEIGHTS[key].is_floating_point():
            assert torch.equal(plain[key], WEIGHTS[key]) and torch.equal(secure[key], WEIGHTS[key])
            continue
        want = WEIGHTS[key].double() + torch.from_numpy(np.asarray(expected[i]))
        assert torch.allclose(plain[key].double(), want, atol=1e-7, rtol=0)
        err = (secure[key].double() - want).abs().max().item()
        assert err <= tolerance, (key, err)
        assert not torch.equal(secure[key], WEIGHTS[key])
    assert plain_summary["secure_aggregation"] is False
    assert secure_summary["secure_aggregation"] is True
    ledger = read_ledger(study.run_dir / "ledger.jsonl")
    statuses = {e["site"]: e["status"] for e in ledger}
    assert statuses == {f"site-{n}": "refused" if n in refuse else "trained" for n in SUBJECTS}


def test_with_secure_aggregation_the_server_never_holds_a_single_sites_delta(tmp_path, monkeypatch):
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    weights = {"a.weight": torch.zeros(4, 3), "a.bias": torch.ones(5)}
    deltas = _deltas(11, {k: tuple(v.shape) for k, v in weights.items()})
    _, _, seen, grid, _ = _federate(tmp_path, monkeypatch, True, deltas, weights)
    singles = [d for ds in deltas.values() for d in ds]

    def holds_a_single(arrays) -> bool:
        return any(
            a.shape == d.shape and np.allclose(a, d, atol=1e-6) for a in arrays for d in singles
        )

    # what the strategy got: the aggregate, the same for every site, no site's own delta
    assert len(seen) == 3 and all(
        np.array_equal(x, y) for s in seen[1:] for x, y in zip(seen[0], s, strict=True)
    )
    assert not holds_a_single(seen[0])
    # everything the server received: no parameters, only masked integer vectors
    masked = 0
    for reply in grid.received:
        assert not reply.has_error(), reply.error
        for record in reply.content.array_records.values():
            assert len(record) == 0  # the mod cleared the parameters it masked
        configs = reply.content.config_records[RECORD_KEY_CONFIGS]
        if Key.MASKED_PARAMETERS in configs:
            vectors = [bytes_to_ndarray(b) for b in configs[Key.MASKED_PARAMETERS]]
            assert all(v.dtype.kind in "iu" for v in vectors)
            assert not holds_a_single([v.astype(np.float64) for v in vectors])
            masked += 1
    assert masked == 3


def test_a_delta_beyond_the_clipping_range_fails_loudly():
    from fedsynth.client.client_app import _check_fits_clipping_range
    from fedsynth.common.errors import FedsynthError

    delta = {"w": np.array([0.5, -5.0], np.float32)}
    with pytest.raises(FedsynthError, match="exceeds the secure aggregation clipping range 4"):
        _check_fits_clipping_range(delta, {"clipping-range": 4.0}, "site-1")
    _check_fits_clipping_range(delta, {"clipping-range": 0.0}, "site-1")  # plain
