"""The arrays a round brings back, checked before anything is written or applied.

Plain FedAvg: one site's reply with a NaN, too few or too many arrays, another shape or
another dtype counts as no valid reply (charged the estimate, one warning line naming the
check), and the others' round aggregates. SecAgg+ (real rounds over a LoopbackGrid,
tests/fake_sites.py): one faulty site's NaN, or a delta beyond the clipping range from a
site whose SecAgg+ client does not clip, shows in the unmasked mean; the round is
discarded (the sites' ledger lines stay, the model is unchanged, the round's facts say
why).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable

import numpy as np
import pytest
import torch
from fake_sites import FakeSite
from test_study_rounds import SHAPES, SUBJECTS, _federate, _lines, _never_below, _study

from fedsynth.common.checkpoint import read_metadata

Fault = Callable[[list[np.ndarray]], list[np.ndarray]]


class FaultySite(FakeSite):
    """A FakeSite whose reply arrays pass through `fault` (None: as a real site's)."""

    fault: Fault | None = None

    def fit(self, parameters, config):
        arrays, subjects, metrics = super().fit(parameters, config)
        return (self.fault(arrays) if self.fault else arrays), subjects, metrics


def _sites(tmp_path) -> dict[int, FaultySite]:
    return {
        n: FaultySite(n, s, SHAPES, tmp_path / "sites" / f"site-{n}") for n, s in SUBJECTS.items()
    }


def _weights(study, round_number: int = 1) -> dict[str, np.ndarray]:
    path = study.run_dir / "rounds" / f"round-{round_number:03d}" / "unet.pt"
    return {k: v.double().numpy() for k, v in torch.load(path, weights_only=True).items()}


def _nan_at(index: int) -> Fault:
    def fault(arrays):
        arrays[0] = arrays[0].copy()
        arrays[0].flat[index] = np.nan
        return arrays

    return fault


PLAIN_FAULTS: dict[str, tuple[Fault, str]] = {
    "nan": (_nan_at(5), "w holds non-finite values"),
    "too-few": (lambda a: a[:1], "1 arrays for 2 tensors"),
    "too-many": (lambda a: [*a, a[1]], "3 arrays for 2 tensors"),
    "shape": (lambda a: [a[0].reshape(4, 3), a[1]], "w has another shape than the global tensor"),
    "dtype": (
        lambda a: [a[0].astype(np.float64), a[1]],
        "w has another dtype than the global tensor",
    ),
}


@pytest.mark.parametrize("fault", list(PLAIN_FAULTS))
def test_a_plain_reply_with_unusable_arrays_counts_as_no_reply(
    tmp_path, monkeypatch, caplog, fault
):
    """Site 2's arrays are refused before any line: it is charged the estimate, sites 1
    and 3 are charged as trained and their subject-weighted mean is applied, finite. One
    warning line names the check, never a value."""
    study, sites = _study(tmp_path, 1, False), _sites(tmp_path)
    sites[2].fault, check = PLAIN_FAULTS[fault]
    _, ledger, _ = _federate(study, sites, monkeypatch)
    assert {e["site"]: (e["status"], bool(e.get("estimate"))) for e in ledger} == {
        "site-1": ("trained", False),
        "site-2": ("no-reply", True),
        "site-3": ("trained", False),
    }
    lines = [r.getMessage() for r in caplog.records if "cannot use" in r.getMessage()]
    assert lines == [f"round 1: site-2 sent a reply the server cannot use: arrays: {check}"]
    after = _weights(study)
    for i, key in enumerate(SHAPES):  # sites 1 and 3, equal subjects
        want = (sites[1].delta[i] + sites[3].delta[i]) / 2
        assert np.abs(after[key] - want).max() < 1e-6, key
    _never_below(study, sites, ledger)


def _secagg_round(tmp_path, monkeypatch, caplog, sites) -> None:
    """One SecAgg+ round of three sites, site 2 faulty; asserts it was discarded."""
    study = _study(tmp_path, 1, True)
    with caplog.at_level(logging.INFO):
        summary, ledger, grid = _federate(study, sites, monkeypatch)
    assert not [d for d in grid.deliveries if d.replied is False]  # every site answered
    assert summary["rounds_done"] == 1
    warning = (
        "round 1 not aggregated: the unmasked aggregate: w is beyond the clipping range 4: "
        "not what honest sites can send; the model is unchanged"
    )
    assert warning in caplog.text
    # the sites spent: every one is charged as trained, once
    for site in sites.values():
        assert _lines(ledger, site.name) == [(1, "trained", False, False)]
    _never_below(study, sites, ledger)
    after = _weights(study)
    assert all(not np.any(after[k]) for k in SHAPES)  # the starting zeros, unchanged
    facts = read_metadata(study.run_dir / "rounds" / "round-001")
    assert facts["sites_trained"] == 3 and "beyond the clipping range" in facts["skipped"]


def test_a_nan_from_one_secagg_site_discards_the_round(tmp_path, monkeypatch, caplog):
    """Flower's quantize turns a NaN into int32 -2**31; with quantization_range below
    2**31 / sites the weight's mean lies beyond the clipping range whatever the honest
    sites sent. The NaN is put where sites 1 and 3 together moved the weight down: with
    2**30 levels for 3 sites (before) the mean there was clip + (d1 + d3) / 3, inside
    the range, and came through as a finite shift."""
    sites = _sites(tmp_path)
    honest = sites[1].delta[0] + sites[3].delta[0]
    index = int(np.argmin(honest))
    assert honest.flat[index] < 0  # the case a range check alone misses with 2**30 levels
    sites[2].fault = _nan_at(index)
    _secagg_round(tmp_path, monkeypatch, caplog, sites)


def test_a_delta_beyond_the_clipping_range_from_one_secagg_site_discards_the_round(
    tmp_path, monkeypatch, caplog
):
    """A site whose SecAgg+ client does not clip (Flower's quantize without its np.clip;
    the same for every |delta| within the range, so the honest sites are unaffected)
    sends 20 in one weight, 5 x the range: the mean there is about 6.7 > 4."""
    from flwr.common.secure_aggregation.quantization import _stochastic_round

    def unclipped(parameters, clipping_range, target_range):
        scale = target_range / (2 * clipping_range)
        return [_stochastic_round((a + clipping_range) * scale) for a in parameters]

    # the module (its package exports the mod function under the same name)
    secaggplus = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    monkeypatch.setattr(secaggplus, "quantize", unclipped)
    sites = _sites(tmp_path)

    def too_large(arrays):
        arrays[0] = arrays[0].copy()
        arrays[0].flat[0] = 20.0
        return arrays

    sites[2].fault = too_large
    _secagg_round(tmp_path, monkeypatch, caplog, sites)


def test_the_aggregate_check_allows_the_rounding_of_honest_sites_and_no_more():
    """Unit check of `aggregate_problem`: an honest mean at the clipping range plus the
    sites' stochastic rounding passes; beyond it, or with a weight no honest site has
    (0 subjects, more than max-weight), the round is refused, without dividing by 0."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    from fedsynth.server.reply_arrays import aggregate_problem

    weights = {"w": torch.zeros(2, 2), "b": torch.zeros(())}
    clip, levels, max_weight = 4.0, 2**29, 10.0
    rounding = 2 * 3 * (2 * clip / levels) / 3.0  # 3 sites of weight 1: see the module

    def check(w_value, subjects=(10, 10, 10), arrays=None):
        mean = arrays or [np.full((2, 2), w_value), np.zeros(1)]
        params = ndarrays_to_parameters(mean)
        results = [FitRes(Status(Code.OK, ""), params, n, {}) for n in subjects]
        return aggregate_problem(results, weights, clip, levels, max_weight)

    assert check(clip) == check(-clip) == check(clip + 0.9 * rounding) == ""
    assert "w is beyond the clipping range 4" in check(clip + 1.1 * rounding)
    assert "w is not finite" in check(np.nan)
    for subjects in ((0, 0, 0), (10, 11, 10)):
        assert "subjects are not between 1 and secagg-max-weight" in check(0.0, subjects)
    assert "1 arrays for 2 tensors" in check(0.0, arrays=[np.zeros((2, 2))])
    assert "w has another number of values" in check(0.0, arrays=[np.zeros(3), np.zeros(1)])
    assert "b is not finite floating point" in check(
        0.0, arrays=[np.zeros((2, 2)), np.ones(1, int)]
    )
