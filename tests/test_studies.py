"""The studies of docs/results.md (`fedsynth study NAME`) on a tiny simulation.

An arm must be the finetune it names (its sites, subjects, epsilon, subset, start) and a
cached arm must be the same arm; each study's figures must follow from its arms' losses,
or a table in docs/results.md would say something its runs did not measure.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import statistics
from functools import partial

import pytest
import torch

import fedsynth.simulations.arms as arms_module
from fedsynth.client.budget import sample_rate
from fedsynth.common.config import load_config
from fedsynth.simulations.arms import Arm, StudyContext, StudySetup, mean_loss
from fedsynth.simulations.ceiling import CeilingPlan, finetune_ceiling, mean_of, plan_facts
from fedsynth.simulations.federated import noise_multiplier
from fedsynth.simulations.study_data import SITE_HELD_OUT_SUBJECTS

SUBJECTS = 4
OVERRIDES = {
    "federation.rounds": 1,
    "privacy.trainable": "norms",
    "training.finetune-learning-rate": 1e-2,
    "sampling.steps": 2,
}
CEILING = CeilingPlan(max_steps=40, check_every=10, patience=2)  # seconds at the tiny size


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("study-cache")


@pytest.fixture(scope="module")
def context(cache):
    """A tiny simulation (phantoms, checkpoint, held-out subjects) in its own cache."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    config = load_config("tiny", {**OVERRIDES, "paths.cache-dir": str(cache)})
    try:
        yield StudyContext(StudySetup(config, SUBJECTS))
    finally:
        torch.set_num_threads(threads)


def test_an_arm_is_run_once_and_a_changed_arm_or_seed_is_run_again(context, monkeypatch):
    arm = Arm(tuple(context.names), 10.0)
    first = context.run(arm, 0)
    assert len(first["loss"]) == 2 and set(first["loss"][0]) == set(context.names)
    assert all(v > 0 for v in first["noise"].values())

    def no_training(*args, **kwargs):
        raise AssertionError("a cached arm was trained again")

    monkeypatch.setattr(arms_module, "federate", no_training)
    again = context.run(arm, 0, keep_weights=True)
    assert again["loss"] == first["loss"] and again["noise"] == first["noise"]
    assert set(again["weights"]) == set(context.public)
    for changed, seed in (
        (arm, 1),
        (Arm(arm.sites, 5.0), 0),
        (Arm(arm.sites, None), 0),
        (Arm(arm.sites, 10.0, trainable="attention"), 0),
        (Arm(arm.sites[:1], 10.0), 0),
        (Arm(arm.sites, 10.0, learning_rate=1e-3), 0),
    ):
        with pytest.raises(AssertionError, match="trained again"):
            context.run(changed, seed)
    faster = load_config(
        "tiny",
        {
            **OVERRIDES,
            "paths.cache-dir": str(context.cache),
            "federation.server-learning-rate": 2.0,
        },
    )
    monkeypatch.setattr(context, "setup", StudySetup(faster, SUBJECTS))
    with pytest.raises(AssertionError, match="trained again"):
        context.run(arm, 0)


def test_a_pooled_arm_is_one_site_of_every_subject_at_the_sites_sample_rate(context):
    everyone = tuple(context.names)
    pooled = context.training_sites(Arm(everyone, 10.0, pooled=True))
    [(name, site)] = pooled.items()
    assert name == "pooled"
    assert site.n_subjects == len(torch.unique(site.subjects)) == SUBJECTS * len(everyone)
    assert len(site.latents) == sum(len(context.sites[n].latents) for n in everyone)
    config = context.config_for(Arm(everyone, 10.0, pooled=True))
    rate = sample_rate(config.privacy, site.n_subjects)
    assert rate == sample_rate(context.setup.config.privacy, SUBJECTS)
    assert config.privacy.batch_size == context.setup.config.privacy.batch_size * len(everyone)


def test_an_arm_at_another_site_rate_scales_fedadams_rate_alike(context, monkeypatch):
    """FedAdam moves each weight by about its rate a round, whatever the sites' rate: an
    arm that slows its sites (from scratch, a larger subset) slows FedAdam by as much."""
    fedadam = load_config(
        "tiny",
        {
            **OVERRIDES,
            "federation.server-optimizer": "adam",
            "federation.server-learning-rate": 0.01,
        },
    )
    monkeypatch.setattr(context, "setup", StudySetup(fedadam, SUBJECTS))
    site_rate = OVERRIDES["training.finetune-learning-rate"]
    default = context.config_for(Arm(("site-1",), 1.0))
    assert default.federation.server_learning_rate == 0.01
    scratch = context.config_for(Arm(("site-1",), 1.0, trainable="all", start="scratch"))
    factor = fedadam.training.pretrain_learning_rate / site_rate
    assert factor != 1.0
    assert scratch.federation.server_learning_rate == pytest.approx(0.01 * factor)
    slower = context.config_for(Arm(("site-1",), 1.0, learning_rate=site_rate / 4))
    assert slower.federation.server_learning_rate == pytest.approx(0.01 / 4)
    assert slower.federation.server_optimizer == "adam"


def test_an_arm_trains_its_subjects_subset_and_start(context):
    [(_, site)] = context.training_sites(Arm(("site-2",), 1.0, subjects=2)).items()
    assert site.n_subjects == 2 and int(site.subjects.max()) == 1
    config = context.config_for(Arm(("site-1",), 1.0, trainable="all", start="scratch"))
    assert config.privacy.trainable == "all" and config.privacy.target_epsilon == 1.0
    assert config.privacy.grad_sample_mode == "functorch"
    pretraining_rate = context.setup.config.training.pretrain_learning_rate
    assert config.training.finetune_learning_rate == pretraining_rate
    assert config.federation.server_learning_rate == 1.0  # FedAvg (tiny): the rate stays
    public = context.config_for(Arm(("site-1",), 1.0, trainable="all"))
    assert public.training.finetune_learning_rate == OVERRIDES["training.finetune-learning-rate"]
    scratch = context.start(Arm(("site-1",), 1.0, start="scratch"), 0)
    assert all(
        torch.equal(v, context.start(Arm(("site-1",), 1.0, start="scratch"), 0)[k])
        for k, v in scratch.items()
    )
    floats = [k for k, v in scratch.items() if v.is_floating_point() and v.numel() > 1]
    changed = sum(not torch.equal(scratch[k], context.public[k]) for k in floats)
    assert changed > 0.9 * len(floats)  # a fresh network, not the checkpoint
    with pytest.raises(ValueError, match="start must be"):
        Arm(("site-1",), 1.0, start="imagenet")
    with pytest.raises(ValueError, match="unknown sites"):
        context.training_sites(Arm(("site-9",), 1.0))


def test_controllability_measures_one_sample_per_held_out_volume(context):
    from fedsynth.common.anatomy import VolumeMeter, meter_path
    from fedsynth.common.checkpoint import load_torch

    meter = VolumeMeter.from_state(load_torch(meter_path(context.pretrained.folder)))
    held_out = sum(len(rows) for rows in context.site_domain.rows.values())
    real = context.site_domain.controllability(None, meter)
    sampled = context.site_domain.controllability(context.public, meter)
    assert real["lv"]["n"] == sampled["lv"]["n"] == held_out
    assert real["lv"]["mae_ml"] != sampled["lv"]["mae_ml"]


def _study(name: str, cache, tmp_path, *extra: str) -> dict:
    from fedsynth.common.cli import main

    argv = [
        "study",
        name,
        "--config",
        "tiny",
        "--subjects",
        str(SUBJECTS),
        "--out",
        str(tmp_path),
        "-c",
        f"paths.cache-dir={cache}",
        *extra,
    ]
    for key, value in OVERRIDES.items():
        argv += ["-c", f"{key}={value}"]
    assert main(argv) == 0
    assert (tmp_path / f"{name}.png").stat().st_size > 10_000
    return json.loads((tmp_path / f"{name}.json").read_text())


def test_federation_study_compares_each_site_alone_federated_and_pooled(
    context, cache, tmp_path, capsys
):
    result = _study("federation", cache, tmp_path)
    [run] = result["runs"]
    assert list(run["final"]) == [*(f"{n} alone" for n in context.names), "federated", "pooled"]
    singles = min(run["final"][f"{n} alone"]["mean"] for n in context.names)
    assert run["federated_beats_every_site"] == (run["final"]["federated"]["mean"] < singles)
    for losses in run["final"].values():
        assert losses["mean"] == pytest.approx(mean_loss({n: losses[n] for n in context.names}))
    federated = context.run(Arm(tuple(context.names), 10.0), 0)  # the same arm, cached
    assert run["final"]["federated"]["site-1"] == federated["loss"][-1]["site-1"]
    assert "federated" in capsys.readouterr().out


def test_scale_study_varies_site_size_and_number_of_sites(context, cache, tmp_path, monkeypatch):
    result = _study("scale", cache, tmp_path)
    rows = result["runs"][0]["rows"]
    assert {(r["sites"], r["subjects_per_site"]) for r in rows} == {(3, 2), (3, 4), (1, 4), (2, 4)}
    monkeypatch.setattr(arms_module, "federate", lambda *a, **k: pytest.fail("trained again"))
    epsilon = context.setup.config.privacy.target_epsilon  # its every-subject arm is the
    context.run(Arm(tuple(context.names), epsilon), 0)  # other studies' federated arm
    for row in rows:  # each site plans its noise for its own size, as a real site would
        assert len(row["noise"]) == row["sites"]
        planned = noise_multiplier(context.setup.config, row["subjects_per_site"])
        assert set(row["noise"].values()) == {planned}


def test_pretraining_and_trainable_studies(context, cache, tmp_path):
    result = _study("pretraining", cache, tmp_path / "a")
    rows = result["runs"][0]["rows"]
    assert [r["epsilon"] for r in rows] == [1.0, 5.0, 10.0, None]
    assert len({r["public"]["start"] for r in rows}) == 1  # every public arm starts alike
    assert all(r["scratch"]["start"] != r["public"]["start"] for r in rows)

    result = _study("trainable", cache, tmp_path / "c")
    rows = {r["trainable"]: r for r in result["runs"][0]["rows"]}
    assert list(rows) == ["attention", "norms", "norms+attention", "all"]
    assert rows["norms"]["learning_rate"] == OVERRIDES["training.finetune-learning-rate"]
    for row in rows.values():  # the same update norm lr * sqrt(d) for every subset
        norm = row["learning_rate"] * math.sqrt(row["weights"])
        assert norm == pytest.approx(
            rows["norms"]["learning_rate"] * math.sqrt(rows["norms"]["weights"])
        )
    weights = [rows[name]["weights"] for name in ("norms", "attention", "norms+attention", "all")]
    assert weights == sorted(set(weights))
    for row in rows.values():
        gap = row["public"] - row["loss"]["none"]
        expected = (row["public"] - row["loss"]["10"]) / gap if gap > 0 else math.nan
        assert row["share"]["10"] == pytest.approx(expected, nan_ok=True)
    assert len({row["loss"]["10"] for row in rows.values()}) == 4  # four different finetunes


def test_controllability_and_downstream_studies(context, cache, tmp_path):
    result = _study("controllability", cache, tmp_path / "d")
    assert [r["epsilon"] for r in result["runs"][0]["rows"]] == [1.0, 5.0, 10.0, None]
    assert result["real"]["lv"]["n"] == result["runs"][0]["rows"][0]["lv"]["n"]

    result = _study("downstream", cache, tmp_path / "e")
    measured = result["runs"][0]["results"]
    assert list(measured) == [
        "real only",
        "synthetic (public checkpoint) only",
        "synthetic (public checkpoint) -> real",
        "synthetic (federated DP, eps 10) only",
        "synthetic (federated DP, eps 10) -> real",
    ]
    assert result["real_volumes"] == 2 * 3 * 4
    assert result["test_volumes"] == 2 * SITE_HELD_OUT_SUBJECTS * 3
    assert len({m["mae_ml"] for m in measured.values()}) == 5


def test_a_federation_title_names_a_server_step_other_than_fedavg():
    from fedsynth.simulations.study_views import _server_rate

    def title(**federation) -> str:
        return _server_rate({"config": {"federation": federation}})

    assert title() == "" and title(**{"server-learning-rate": 1.0}) == ""  # FedAvg
    assert title(**{"server-learning-rate": 2.0}) == ", server learning rate 2"
    adam = {"server-learning-rate": 0.01, "server-optimizer": "adam"}
    assert title(**adam) == ", server optimiser FedAdam at rate 0.01"


def test_a_subsets_share_is_not_given_where_its_noiseless_run_gained_less(tmp_path):
    """A share above 100% of a noiseless run that barely moved says nothing: n/a, no bar."""
    from fedsynth.simulations.study_views import VIEWS

    def row(name: str, none: float) -> dict:
        loss = {"1": 0.21, "10": 0.20, "none": none}
        share = {k: (0.22 - loss[k]) / (0.22 - none) for k in ("1", "10")}
        return {
            "trainable": name,
            "weights": 10,
            "learning_rate": 1e-2,
            "public": 0.22,
            "loss": loss,
            "share": share,
        }

    result = {"runs": [{"seed": 0, "rows": [row("norms", 0.18), row("all", 0.219)]}]}
    table, plot = VIEWS["trainable"]
    norms, whole = table(result).splitlines()[-2:]
    assert norms.split()[-2:] == ["25%", "50%"]
    assert whole.split()[-2:] == ["n/a", "n/a"]
    plot(result, tmp_path / "trainable.png")
    assert (tmp_path / "trainable.png").stat().st_size > 10_000


def test_the_held_out_folder_names_its_count_and_every_site_has_that_many_subjects(context):
    """A folder of another count (10 subjects before) is never reused for 30."""
    assert f"subjects{SITE_HELD_OUT_SUBJECTS}" in context.data.held_out.name
    for site in context.names:
        assert len(set(context.site_domain.subjects[site])) == SITE_HELD_OUT_SUBJECTS
        assert len(context.site_domain.rows[site]) == 2 * SITE_HELD_OUT_SUBJECTS  # ED + ES


def test_a_ceilings_cache_keys_hash_its_rate_only_where_it_differs_from_the_pretraining_rate():
    """Ceilings cached before the plan had a rate trained at the pretraining rate: their
    plan hashes as it did then (no learning_rate), so their keys and summaries stay."""
    before = {"max_steps": 3000, "check_every": 100, "patience": 4}
    constant = load_config("tiny")  # pretrains at 5e-4, the plan's rate
    assert plan_facts(CeilingPlan(), constant) == before
    faster = CeilingPlan(learning_rate=1e-2)
    assert plan_facts(faster, constant) == {**before, "learning_rate": 1e-2}
    peak = load_config("tiny", {"training.pretrain-learning-rate": 2e-3})
    assert plan_facts(CeilingPlan(), peak) == {**before, "learning_rate": 5e-4}


def test_the_ceiling_improves_on_the_public_loss_and_stops_by_patience(context):
    pooled = context.training_sites(Arm(tuple(context.names), None, pooled=True))["pooled"]
    config, evaluate = context.setup.config, context.site_domain.loss
    result, weights = finetune_ceiling(config, context.public, pooled, evaluate, 0, CEILING)
    public = result["checks"][0]["loss"]
    assert [c["step"] for c in result["checks"]] == [0, 10, 20, 30, 40]
    assert result["best_step"] > 0 and mean_of(result["best"]) < mean_of(public)
    assert evaluate(weights) == result["best"]  # the best check's weights come back
    # at a rate that overshoots, every check is worse than the start: it stops after
    # `patience` checks and keeps the public checkpoint
    plan = CeilingPlan(max_steps=100, check_every=5, patience=2, learning_rate=1e-2)
    result, weights = finetune_ceiling(config, context.public, pooled, evaluate, 0, plan)
    assert [c["step"] for c in result["checks"]] == [0, 5, 10]
    assert result["best_step"] == 0 and result["best"] == public
    assert all(torch.equal(weights[k], v) for k, v in context.public.items())


def test_dp_gap_study_measures_dp_against_the_ceiling_with_fidelity_spread_and_montages(
    context, cache, tmp_path, monkeypatch, capsys
):
    from PIL import Image

    monkeypatch.setattr(arms_module, "StudySetup", partial(StudySetup, ceiling=CEILING))
    result = _study("dp-gap", cache, tmp_path)
    [run] = result["runs"]
    dp, reference, ceiling = run["dp"], run["nonprivate"], run["ceiling"]
    assert len(dp["loss"]) == len(reference["loss"]) == 2  # round 0 and one round
    assert dp["loss"][0] == reference["loss"][0]  # both start from the public checkpoint
    assert all(v > 0 for v in dp["noise"].values()) and set(reference["noise"].values()) == {0}
    # the ceiling is the context's, cached: the same checks and best step
    monkeypatch.setattr(
        context, "setup", StudySetup(context.setup.config, SUBJECTS, ceiling=CEILING)
    )
    cached = context.ceiling(0)
    assert ceiling["checks"] == cached["checks"] and ceiling["best"] == cached["best"]
    assert result["ceiling_best_step"] == ceiling["best_step"] > 0
    [best_check] = [c for c in ceiling["checks"] if c["step"] == ceiling["best_step"]]
    assert ceiling["best"] == best_check["loss"]
    public, private, plain, best = (
        dp["loss"][0],
        dp["loss"][-1],
        reference["loss"][-1],
        ceiling["best"],
    )
    assert mean_loss(best) < mean_loss(public)  # a gain to take a share of
    for site in context.names:
        expected = (public[site] - private[site]) / (public[site] - best[site])
        assert run["ceiling_share"][site] == pytest.approx(expected)
        same_steps = (public[site] - private[site]) / (public[site] - plain[site])
        assert run["share"][site] == pytest.approx(same_steps)
    on_mean = (mean_loss(public) - mean_loss(private)) / (mean_loss(public) - mean_loss(best))
    assert result["ceiling_share_of_mean_loss"] == [pytest.approx(on_mean)]
    assert result["mean_site_ceiling_share"] == [
        pytest.approx(statistics.fmean(run["ceiling_share"].values()))
    ]
    # fidelity: every held-out volume of each site sampled once per sampling seed
    fidelity = result["fidelity"]
    assert fidelity["models_of_seed"] == 0 and len(fidelity["sampling_seeds"]) == 3
    assert fidelity["volumes_per_site"] == {s: 2 * SITE_HELD_OUT_SUBJECTS for s in context.names}
    for model in ("public", "dp", "ceiling"):
        assert list(fidelity[model]) == [*context.names, "mean"]
        for metrics in fidelity[model].values():
            assert sorted(metrics) == ["frechet_2d", "frechet_3d"]
            for cell in metrics.values():
                assert len(cell["values"]) == 3 and cell["sd"] > 0
                assert cell["sd"] == pytest.approx(statistics.stdev(cell["values"]))
                assert cell["mean"] == pytest.approx(statistics.fmean(cell["values"]))
        for k in range(3):
            sites = [fidelity[model][s]["frechet_3d"]["values"][k] for s in context.names]
            assert fidelity[model]["mean"]["frechet_3d"]["values"][k] == pytest.approx(
                statistics.fmean(sites)
            )
    assert fidelity["ceiling"] != fidelity["public"]
    monkeypatch.setattr(
        context.site_domain, "fidelity_spread", lambda *a: pytest.fail("sampled again")
    )
    assert context.fidelity(context.public, "public") == fidelity["public"]  # cached
    # a montage per site
    names = [f"dp-gap-montage-{site}.png" for site in context.names]
    assert result["montages"] == names
    for name in names:
        assert Image.open(tmp_path / name).size[0] > 1000
    out = capsys.readouterr().out
    assert "of the ceiling's gain in the sites' mean loss" in out and names[0] in out


def test_a_site_montage_is_real_then_each_model_by_basal_mid_and_apical_slice(context):
    from fedsynth.simulations.study_montage import draw_montage, montage_volumes

    domain, site = context.site_domain, "site-2"
    chosen = montage_volumes(domain.subjects[site], domain.rows[site])
    subjects = [domain.subjects[site][i] for i in chosen]
    assert subjects[0] == subjects[1] != subjects[2] == subjects[3]
    assert [domain.rows[site][i]["phase"] for i in chosen] == [0, 1, 0, 1]  # ED, ES
    real, _, attributes = domain.sites[site]
    index = torch.tensor(chosen)
    sampled = domain.sample(domain.load(context.public), attributes[index])
    models = {"public": sampled, "DP": sampled, "ceiling": sampled}
    fig = draw_montage("site-2", real[index], models, ["a", "b", "c", "d"], context.setup.config)
    columns = 3 * len(chosen)
    assert len(fig.axes) == 4 * columns  # rows: real, public, DP, ceiling
    assert [fig.axes[r * columns].get_ylabel() for r in range(4)] == ["real", *models]
    titles = [ax.get_title() for ax in fig.axes[:columns]]
    assert [t.split("\n")[-1].split()[0] for t in titles] == ["basal", "mid", "apical"] * 4
    assert [t.split("\n")[0] for t in titles[1::3]] == ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match="1 held-out subjects have an ED and an ES volume"):
        montage_volumes(["s1", "s1", "s2"], [{"phase": 0}, {"phase": 1}, {"phase": 0}])


def test_levers_study_changes_one_setting_per_arm_against_the_ceiling(
    context, cache, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(arms_module, "StudySetup", partial(StudySetup, ceiling=CEILING))
    result = _study("levers", cache, tmp_path)
    rows = {row["lever"]: row for row in result["runs"][0]["rows"]}
    assert next(iter(rows)) == "the config's study" and len(rows) == 7
    monkeypatch.setattr(
        context, "setup", StudySetup(context.setup.config, SUBJECTS, ceiling=CEILING)
    )
    ceiling = mean_of(context.ceiling(0)["best"])
    assert result["ceiling"]["loss"] == pytest.approx(ceiling)
    for row in rows.values():
        expected = (row["public"] - row["loss"]) / (row["public"] - ceiling)
        assert row["ceiling_share"] == pytest.approx(expected)
    # each lever is its own finetune, with the one setting it names changed
    config, everyone = context.setup.config, tuple(context.names)
    changed = {
        "privacy.max-grad-norm": lambda c: c.privacy.max_grad_norm,
        "federation.rounds": lambda c: c.federation.rounds,
        "privacy.loss-draws": lambda c: c.privacy.loss_draws,
        "privacy.batch-size": lambda c: c.privacy.batch_size,
        "privacy.local-steps": lambda c: c.privacy.local_steps,
    }
    levers = arms_module_levers(config, SUBJECTS)
    assert "norms only" not in levers  # the tests' subset is norms already
    # one round: no moments to keep, so no lever for them; with two, the lever starts
    # the sites' optimiser fresh each round
    fresh = "the sites' optimiser fresh each round"
    assert fresh not in levers and config.federation.rounds == 1
    two = dataclasses.replace(config.federation, rounds=2)
    lever = arms_module_levers(dataclasses.replace(config, federation=two), SUBJECTS)[fresh]
    assert lever == {"training.finetune-optimizer-state": "fresh"}
    arm = context.config_for(Arm(everyone, 10.0, overrides=tuple(lever.items())))
    assert arm.training.finetune_optimizer_state == "fresh"
    assert config.training.finetune_optimizer_state == "keep"
    assert dict(levers["one full-batch step a round"]) == {
        "privacy.batch-size": SUBJECTS,  # the tiny config's 4 already: q = 1
        "privacy.local-steps": 1,  # and not its 2
    }
    for name, overrides in levers.items():
        if not overrides:  # the config's study, and the rate lever (an Arm field)
            continue
        arm = context.config_for(Arm(everyone, 10.0, overrides=tuple(overrides.items())))
        assert all(changed[key](arm) == value for key, value in overrides.items())
        assert any(changed[key](config) != value for key, value in overrides.items())
        assert rows[name]["loss"] != rows["the config's study"]["loss"]
    doubled = context.run(Arm(everyone, 10.0, overrides=(("federation.rounds", 2),)), 0)
    assert len(doubled["loss"]) == 3  # round 0 and twice the tiny study's one round
    # the public checkpoint trained on its own public subjects, no site data
    public_only = context.ceiling(0, public_only=True)
    assert public_only["checks"][0]["loss"] == context.ceiling(0)["checks"][0]["loss"]
    assert public_only["checks"] != context.ceiling(0)["checks"]
    assert result["public_only"]["loss"] == pytest.approx(mean_of(public_only["best"]))
    assert "public data only" in capsys.readouterr().out


def arms_module_levers(config, subjects: int) -> dict[str, dict]:
    """Each lever's config overrides, by name (studies._levers)."""
    from fedsynth.simulations.studies import _levers

    levers = _levers(config, subjects)
    return {name: dict(fields.get("overrides", ())) for name, fields in levers.items()}


def test_signal_study_measures_one_step_and_compares_the_sites_mean_gradients(
    context, cache, tmp_path, capsys
):
    result = _study("signal", cache, tmp_path)
    [run] = result["runs"]
    steps = context.setup.config.diffusion.train_timesteps
    assert [s["draws"] for s in run["steps"]] == [1, 4, 16, 4, 4, 4, 4]
    quarters = [tuple(s["band"]) for s in run["steps"][3:]]
    assert quarters[0][0] == 0 and quarters[-1][1] == steps
    assert all(a[1] == b[0] for a, b in itertools.pairwise(quarters))  # they tile [0, T)
    assert set(result["weights"]) == {"all", "norms"}
    assert result["weights"]["norms"] < result["weights"]["all"]
    for step in run["steps"]:
        assert all(math.isfinite(v) for v in step["snr"].values())
    assert result["batch"] == SUBJECTS // 2  # two disjoint batches of the site's subjects
    assert result["noise_multiplier"] == pytest.approx(
        noise_multiplier(context.setup.config, SUBJECTS)
    )
    names = [*context.names, "public"]
    assert list(run["cosines"]) == names
    for a in names:  # a population against itself: the sign of its own estimate
        assert abs(run["cosines"][a][a]) == pytest.approx(1.0)
        for b in names:  # both cross products, averaged: symmetric
            assert run["cosines"][a][b] == pytest.approx(run["cosines"][b][a])
    assert "signal-to-noise" in capsys.readouterr().out
