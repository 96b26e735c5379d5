"""A simulated study's end-of-study share of the non-private ceiling's gain.

The ceiling is computed by `fedsynth study dp-gap` (StudyContext.ceiling), which leaves a
summary next to the held-out subjects; the `flwr run` server side (RoundValidation on the
simulation's own SiteDomain) must find it from what it knows, for the same simulation
only, and state the share it computes, or one line naming the command.
"""

from __future__ import annotations

import json
import logging
import shutil
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from fedsynth.common.checkpoint import UNET, load_pretrained, save_torch
from fedsynth.common.config import load_config
from fedsynth.server.round_validation import RoundValidation
from fedsynth.server.run_dir import SITE_DOMAIN_CEILING, validation_dir, write_summary
from fedsynth.server.study import prepare
from fedsynth.simulations import site_domain
from fedsynth.simulations.arms import StudyContext, StudySetup
from fedsynth.simulations.ceiling import CeilingPlan
from fedsynth.simulations.ceiling_summary import share_of_ceiling
from fedsynth.simulations.site_domain import SiteDomain
from fedsynth.simulations.study_data import VALIDATION_SUBJECTS

# what a `flwr run` of the simulation and `fedsynth study dp-gap` both set
SETTINGS = {
    "autoencoder.steps": 5,
    "training.pretrain-steps": 5,
    "training.segmenter-steps": 4,
    "training.feature-steps": 2,
    "training.pretrain-learning-rate": 1e-2,
    "diffusion.train-timesteps": 12,
    "sampling.steps": 2,
    "device": "cpu",
}
SUBJECTS, PUBLIC_SUBJECTS = 4, VALIDATION_SUBJECTS
SMALL_PLAN = partial(CeilingPlan, max_steps=16, check_every=4, patience=4, learning_rate=1e-2)


@pytest.fixture(scope="module")
def simulation(tmp_path_factory):
    """A tiny simulation (its own cache): the study side's context with its ceiling (a
    short plan on both sides), and the server side's study of the same simulation with
    round 0 (the public checkpoint) and round 1 (halfway from it to the ceiling)
    validated."""
    root = tmp_path_factory.mktemp("ceiling-share")
    settings = {**SETTINGS, "paths.cache-dir": str(root / "cache")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(site_domain, "CeilingPlan", SMALL_PLAN)  # the server side's plan
        config = load_config("tiny", settings)
        setup = StudySetup(config, SUBJECTS, (0,), PUBLIC_SUBJECTS, ceiling=SMALL_PLAN())
        context = StudyContext(setup)
        ceiling = context.ceiling(0, keep_weights=True)
        run_config = {
            "config": "tiny",
            "data": "phantoms",
            "run-dir": str(root / "run"),
            "phantom-subjects": SUBJECTS,
            "phantom-public-subjects": PUBLIC_SUBJECTS,
            "federation.secure-aggregation": False,
            "privacy.target-epsilon": 5.0,  # the study's privacy does not change its ceiling
            **settings,
        }
        study = prepare(run_config)
        validation = RoundValidation(study)
        public = context.public
        best = ceiling.pop("weights")
        halfway = {
            k: v + 0.5 * (best[k] - v) if v.is_floating_point() else v for k, v in public.items()
        }
        validation.validate(0, public)
        validation.validate(1, halfway)
        yield SimpleNamespace(context=context, ceiling=ceiling, study=study, validation=validation)
    torch.set_num_threads(threads)


def _clear(simulation) -> None:
    for path in simulation.context.data.held_out.glob(".ceiling-*"):
        path.unlink()


def _ended(simulation, caplog) -> dict:
    """The end of the study on the server side: the share, its log line, summary.json."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        simulation.validation.ceiling_share(1)
    lines = [r.getMessage() for r in caplog.records if "non-private ceiling" in r.getMessage()]
    assert len(lines) == 1, lines
    summary = write_summary(simulation.study, 1)
    result = json.loads((validation_dir(simulation.study) / SITE_DOMAIN_CEILING).read_text())
    assert summary["site_domain"]["ceiling"] == result
    return {**result, "line": lines[0]}


def _losses(simulation, round_number: int) -> dict[str, float]:
    path = validation_dir(simulation.study) / f"round-{round_number:03d}.json"
    return json.loads(path.read_text())["site_domain"]


def test_the_same_simulations_ceiling_gives_the_share_by_site_and_on_the_mean(simulation, caplog):
    _clear(simulation)
    simulation.context.ceiling(0)  # cached: writes its summary again
    [written] = simulation.context.data.held_out.glob(".ceiling-*-seed0.json")
    assert written.stat().st_mode & 0o777 == 0o644  # phantom figures: public
    ceiling = simulation.ceiling
    assert ceiling["best_step"] > 0  # the short ceiling really gained: a share to state
    result = _ended(simulation, caplog)
    public, final = _losses(simulation, 0), _losses(simulation, 1)
    start, best = ceiling["checks"][0]["loss"], ceiling["best"]
    assert start == pytest.approx(public)  # both measured the public checkpoint alike
    sites = sorted(public)
    assert sites == ["site-1", "site-2", "site-3"]
    for site in sites:
        by_hand = (public[site] - final[site]) / (start[site] - best[site])
        assert result["share"][site] == pytest.approx(by_hand)
        assert f"{site} {100 * by_hand:.0f}%" in result["line"]

    def mean(losses: dict[str, float]) -> float:
        return sum(losses.values()) / len(losses)

    by_hand = (mean(public) - mean(final)) / (mean(start) - mean(best))
    assert result["share"]["mean"] == pytest.approx(by_hand)
    assert f"mean {100 * by_hand:.0f}%" in result["line"]
    assert result["ceiling"]["best_step"] == [ceiling["best_step"]]
    assert f"at step {ceiling['best_step']} (seed 0)" in result["line"]


def test_without_the_ceiling_one_line_names_the_command(simulation, caplog):
    _clear(simulation)
    result = _ended(simulation, caplog)
    assert result["share"] is None
    line = result["line"]
    assert "needs the ceiling" in line and "`fedsynth study dp-gap`" in line
    assert "once per simulation (cached)" in line and "\n" not in line


def test_a_ceiling_of_another_checkpoint_is_not_used(simulation, caplog, tmp_path):
    """The same phantoms, held-out subjects and config, another public UNet: its ceiling
    summary (written where this simulation's would be) gives no share."""
    _clear(simulation)
    context = simulation.context
    other = tmp_path / "other-checkpoint"
    shutil.copytree(context.pretrained.folder, other)
    moved = {k: v + 0.01 if v.is_floating_point() else v for k, v in context.public.items()}
    save_torch(other / UNET, moved)
    checker = SiteDomain(load_pretrained(other), context.data.held_out, context.setup.config)
    summaries = checker.ceiling_summaries(context.data.phantoms)
    summaries.write(0, simulation.ceiling)
    assert summaries.path(0).parent == context.data.held_out
    assert _ended(simulation, caplog)["share"] is None
    context.ceiling(0)  # this checkpoint's own: used alone
    result = _ended(simulation, caplog)
    assert list(result["share"]) == ["site-1", "site-2", "site-3", "mean"]
    assert result["ceiling"]["seeds"] == [0]


def test_several_ceiling_seeds_give_the_share_of_their_mean_gain(simulation, caplog):
    _clear(simulation)
    context = simulation.context
    seeds = [context.ceiling(seed) for seed in (0, 1)]
    assert seeds[0]["best"] != seeds[1]["best"]  # two trainings, two ceilings
    result = _ended(simulation, caplog)
    public, final = _losses(simulation, 0), _losses(simulation, 1)
    for site in public:
        gain = sum(c["checks"][0]["loss"][site] - c["best"][site] for c in seeds) / 2
        assert result["share"][site] == pytest.approx((public[site] - final[site]) / gain)
    assert result["ceiling"]["seeds"] == [0, 1]
    steps = [c["best_step"] for c in seeds]
    assert f"best at steps {steps[0]} (seed 0), {steps[1]} (seed 1)" in result["line"]


def test_an_unreadable_summary_is_passed_over_in_one_line(simulation, caplog):
    """A cut or hand-edited summary must not fail the end of a study that is saved."""
    _clear(simulation)
    study = simulation.study
    path = simulation.validation.site_domain.ceiling_summaries(study.phantoms).path(0)
    path.write_text('{"keyed_by": ')
    result = _ended(simulation, caplog)
    assert result["share"] is None and "`fedsynth study dp-gap`" in result["line"]
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(f"{path}: not a ceiling summary") and "\n" not in warning


def test_a_round_without_site_domain_loss_gives_one_warning(simulation, caplog):
    """Round 1's validation failed (it logged why): no share, one line, nothing raised."""
    path = validation_dir(simulation.study) / "round-001.json"
    kept = path.read_text()
    path.write_text(json.dumps({"round": 1}) + "\n")
    try:
        caplog.clear()
        simulation.validation.ceiling_share(1)
    finally:
        path.write_text(kept)
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        "share of the non-private ceiling's gain not computed: round 1 has no site-domain loss"
    )


def test_a_ceiling_that_did_not_gain_gives_no_share():
    public = {"site-1": 0.30, "site-2": 0.20}
    final = {"site-1": 0.28, "site-2": 0.21}
    summary = {"seed": 0, "best_step": 0, "public": public, "best": dict(public)}
    result = share_of_ceiling([summary], public, final)
    assert result["share"] == {"site-1": None, "site-2": None, "mean": None}
    assert "mean n/a (the ceiling did not gain)" in result["note"]
    summary["best"] = {"site-1": 0.26, "site-2": 0.20}  # site-1 gained 0.04, site-2 nothing
    result = share_of_ceiling([summary], public, final)
    assert result["share"]["site-1"] == pytest.approx(0.5)
    assert result["share"]["site-2"] is None
    assert result["share"]["mean"] == pytest.approx((0.25 - 0.245) / 0.02)
