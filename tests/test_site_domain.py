"""Simulation-only site-domain evaluation and the in-process federation studies use.

The site-domain loss must move when (and only when) the model learns the site's data; the
in-process federation must plan the noise a real site plans and average as the strategy
does, or a study's "DP keeps X% of the gain" would compare different computations.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from fake_sites import disclosed
from flwr.app import Context, RecordDict

import fedsynth.server.server_app as server_app
from fedsynth.client.budget import SiteBudget
from fedsynth.client.client_app import app
from fedsynth.client.dp_trainer import train_round
from fedsynth.common.checkpoint import load_pretrained
from fedsynth.common.config import load_config
from fedsynth.common.ledger import read_ledger
from fedsynth.server.round_validation import RoundValidation
from fedsynth.server.study import prepare
from fedsynth.simulations.federated import federate, load_sites, noise_multiplier, subset
from fedsynth.simulations.flwr_overhead import run_overhead
from fedsynth.simulations.loopback import LoopbackGrid, task_identity
from fedsynth.simulations.site_domain import SiteDomain

FAST = {"sampling.steps": 2, "device": "cpu", "training.finetune-learning-rate": 3e-3}


@pytest.fixture
def model(tiny_checkpoint):
    return load_pretrained(tiny_checkpoint)


@pytest.fixture
def sites(model, site_phantoms, tmp_path):
    return load_sites(model, site_phantoms, ["site-1", "site-2"], tmp_path / "states")


def test_site_domain_loss_is_repeatable_and_falls_when_the_model_learns_the_site(
    one_thread, model, site_phantoms, sites
):
    config = load_config("tiny", {**FAST, "privacy.trainable": "all"})
    domain = SiteDomain(model, site_phantoms, config)
    check = domain.loss
    assert list(domain.sites) == ["site-1", "site-2", "site-3"]  # public/ is not a site
    start = {k: v.clone() for k, v in model.unet.state_dict().items()}
    before = check(start)
    assert check(start) == before  # same noise and timesteps: rounds are comparable
    site = sites["site-1"]
    # no noise, every subject each step
    train_round(
        model.unet, site.latents, site.attributes, site.subjects, config, 0.0, 1.0, steps=30, seed=0
    )
    after = check({k: v.clone() for k, v in model.unet.state_dict().items()})
    assert after["site-1"] < before["site-1"] - 0.02, (before, after)
    broken = {
        k: v + 0.3 * torch.randn_like(v) if v.is_floating_point() else v for k, v in start.items()
    }
    assert all(b > before[s] for s, b in check(broken).items())


def test_federation_plans_the_noise_a_real_site_plans(tmp_path):
    config = load_config("default", {"federation.rounds": 4, "privacy.local-steps": 3})
    for subjects in (20, 300):
        site = SiteBudget("site-1", tmp_path / f"s{subjects}", 100.0)
        planned = site.plan_round(config, disclosed(subjects), 1).noise_multiplier
        assert noise_multiplier(config, subjects) == pytest.approx(planned, rel=1e-6)
    assert noise_multiplier(config, 20, private=False) == 0.0


@pytest.mark.parametrize("rate", [1.0, 2.5], ids=["fedavg", "server-rate"])
def test_federation_is_the_subject_weighted_mean_of_the_sites_rounds(
    one_thread, model, sites, rate
):
    config = load_config(
        "tiny", {**FAST, "federation.rounds": 1, "federation.server-learning-rate": rate}
    )
    few = {"site-1": sites["site-1"], "site-2": subset(sites["site-2"], 2)}
    assert few["site-2"].n_subjects == 2 and few["site-1"].n_subjects == 6
    start = {k: v.clone() for k, v in model.unet.state_dict().items()}
    run = federate(config, start, model.unet, few, private=True, seed=5)
    assert set(run.noise) == {"site-1", "site-2"} and all(v > 0 for v in run.noise.values())
    # each site alone, as federate seeds it, then the 6:2 weighted mean of their deltas
    trained = []
    for k, (name, site) in enumerate(few.items()):
        model.unet.load_state_dict(start)
        train_round(
            model.unet,
            site.latents,
            site.attributes,
            site.subjects,
            config,
            run.noise[name],
            min(1.0, config.privacy.batch_size / site.n_subjects),
            config.privacy.local_steps,
            seed=5 * 1_000_003 + 1009 + k,
        )
        trained.append({key: v.clone() for key, v in model.unet.state_dict().items()})
    moved = 0
    for key, value in start.items():
        if not value.is_floating_point():
            continue
        expected = value.double() + rate * (
            0.75 * (trained[0][key].double() - value.double())
            + 0.25 * (trained[1][key].double() - value.double())
        )
        assert torch.allclose(run.weights[key].double(), expected, atol=1e-6), key
        moved += int(not torch.equal(run.weights[key], value))
    assert moved > 0  # the trainable subset really changed


def test_a_simulated_study_reports_site_domain_losses_every_round(
    one_thread, tmp_path, tiny_checkpoint, site_phantoms, caplog
):
    run_config = {
        "config": "tiny",
        "run-dir": str(tmp_path / "run"),
        "checkpoint": str(tiny_checkpoint),
        "federation.rounds": 2,
        "federation.secure-aggregation": False,
        "sampling.steps": 2,
        "validation-data": str(site_phantoms / "public"),
    }
    study = prepare(run_config)
    assert study.site_domain is None  # real sites: nothing reads their data
    from dataclasses import replace

    # what a simulation passes in (fedsynth.simulations.study_data.simulated_data)
    study = replace(
        study, site_domain=lambda pretrained: SiteDomain(pretrained, site_phantoms, study.config)
    )
    nodes = {
        k: {
            "data-path": str(site_phantoms / f"site-{k}"),
            "state-dir": str(study.run_dir / "sites" / f"site-{k}"),
            "site-name": f"site-{k}",
            "max-epsilon": 10.0,
            "require-secure-aggregation": False,
        }
        for k in (1, 2, 3)
    }
    validated_on, validated_until = {}, {}  # round -> the validating thread, its end
    validate = RoundValidation.validate

    def recording(self, round_number, weights=None):
        validated_on[round_number] = threading.current_thread().name
        try:
            return validate(self, round_number, weights)
        finally:
            validated_until[round_number] = time.time()

    with task_identity(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(RoundValidation, "validate", recording)
        summary = server_app.run_federation(
            LoopbackGrid(app, nodes), study, Context(1, 0, {}, RecordDict(), {})
        )
    # round 0 before any round; later rounds on the validation thread while the next trains
    assert validated_on[0] == threading.main_thread().name
    assert [validated_on[r].startswith("fedsynth-validation") for r in (1, 2)] == [True, True]
    site_domain = summary["site_domain"]
    assert "simulation only" in site_domain["note"]
    assert sorted(site_domain["loss"]) == ["0", "1", "2"]  # 0: the public checkpoint
    assert all(sorted(v) == ["site-1", "site-2", "site-3"] for v in site_domain["loss"].values())
    assert json.loads((study.run_dir / "summary.json").read_text())["site_domain"] == site_domain
    fidelity = site_domain["fidelity"]  # samples of the public and the final model
    assert sorted(fidelity) == ["0", "2"]
    for measured in fidelity.values():
        assert sorted(measured) == ["site-1", "site-2", "site-3"]
        assert all(v["frechet_3d"] > 0 and v["frechet_2d"] > 0 for v in measured.values())
    assert fidelity["0"] != fidelity["2"]  # the trained model's samples differ
    [cached] = site_phantoms.glob(".public-fidelity-*.json")  # the public one, kept for reuse
    assert json.loads(cached.read_text()) == fidelity["0"]
    out = caplog.text
    assert "round 0 (public checkpoint): validation loss" in out
    assert out.count("site-domain loss (simulation only) site-1") == 3
    assert "round 1 validation: validation loss" in out and "round 2 validation: " in out
    # where the rounds' time went: the server's round times, each site's DP-SGD in its
    # own ledger (never sent), and the overhead of round 2 from both
    timing = json.loads((study.run_dir / "timing.json").read_text())["rounds"]
    assert [r["round"] for r in timing] == [1, 2]
    assert all(r["started"] <= r["replies"] <= r["ended"] for r in timing)
    assert timing[0]["ended"] <= timing[1]["started"]
    assert timing[1]["started"] < validated_until[1]  # round 2 did not wait for it
    lengths = []
    for k in (1, 2, 3):
        own = read_ledger(study.run_dir / "sites" / f"site-{k}" / "ledger.jsonl")
        assert [e["round"] for e in own] == [1, 2]
        for entry, times in zip(own, timing, strict=True):
            start, end = entry["dp_sgd"]
            assert times["started"] < start < end < times["replies"]
        lengths.append(own[1]["dp_sgd"][1] - own[1]["dp_sgd"][0])
    measured = run_overhead(study.run_dir)
    assert measured.rounds == 1
    assert measured.round_seconds == pytest.approx(timing[1]["ended"] - timing[0]["ended"])
    # the loopback grid trains one site after another: the union is their sum
    assert measured.training_seconds == pytest.approx(sum(lengths))
    assert 0 < measured.overhead < 1
    # round 0 only: the held-out volumes beside their autoencoder reconstructions
    validation = study.run_dir / "validation"
    entries = [json.loads((validation / f"round-{k:03d}.json").read_text()) for k in (0, 1, 2)]
    assert [("reconstruction_mae" in e) for e in entries] == [True, False, False]
    assert 0 < entries[0]["reconstruction_mae"] < 0.5
    assert out.count("autoencoder reconstruction MAE") == 1
    from PIL import Image

    width, height = Image.open(validation / "reconstruction.png").size
    assert width > 1000 and height >= 2 * 280  # pairs side by side, one pair per row
