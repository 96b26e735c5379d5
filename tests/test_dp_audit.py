"""The one-run privacy audit (`fedsynth study dp-audit`) on a tiny simulation: it must
catch DP-SGD with its noise switched off and must not refute the real settings' epsilon."""

from __future__ import annotations

import pytest
import torch

from fedsynth.common.config import load_config
from fedsynth.common.errors import FedsynthError
from fedsynth.simulations import study_cmd
from fedsynth.simulations.arms import StudyContext, StudySetup
from fedsynth.simulations.audit_bound import largest_certifiable
from fedsynth.simulations.canaries import AuditPlan, canary_scores, make_canaries
from fedsynth.simulations.dp_audit import audit_once, guess
from fedsynth.simulations.federated import noise_multiplier

CLAIMED = 1.0
CANARIES = 128
# every subject in every step, 8 steps: without noise each member's weight moves 8 times
AUDITED = {
    "privacy.target-epsilon": CLAIMED,
    "privacy.batch-size": None,
    "privacy.sample-rate": 1.0,
    "privacy.local-steps": 4,
}


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cache = tmp_path_factory.mktemp("audit-cache")
    config = load_config("tiny", {**AUDITED, "paths.cache-dir": str(cache)})
    try:
        yield StudyContext(StudySetup(config, 4))
    finally:
        torch.set_num_threads(threads)


def test_canaries_sit_on_distinct_weights_with_the_clip_as_norm():
    shapes = {"a": torch.Size([3, 4]), "b": torch.Size([5])}
    canaries = make_canaries(shapes, 17, 0.1, seed=3)
    coordinates = {(n, int(k)) for n, k in zip(canaries.names, canaries.flat, strict=True)}
    assert len(coordinates) == 17  # every weight of the 17 once
    assert 0 < canaries.size < 17 and canaries.size == int(canaries.included.sum())
    params = {n: torch.nn.Parameter(torch.zeros(s)) for n, s in shapes.items()}
    sampled = torch.arange(canaries.size)
    rows = canaries.gradients(sampled, params)
    per_subject = torch.cat([rows[n].flatten(1) for n in shapes], dim=1)
    assert torch.allclose(per_subject.norm(dim=1), torch.full((canaries.size,), 0.1))
    with pytest.raises(ValueError, match="one per trained weight"):
        make_canaries(shapes, 18, 0.1, seed=3)


def test_a_weight_moved_against_its_canary_gradient_scores_positive():
    canaries = make_canaries({"w": torch.Size([10])}, 4, 1.0, seed=0)
    start = {"w": torch.zeros(10)}
    final = {"w": torch.zeros(10)}
    for k, sign in zip(canaries.flat, canaries.signs, strict=True):
        final["w"][int(k)] = -0.5 * float(sign)  # descent: against the gradient's sign
    assert torch.allclose(canary_scores(canaries, start, final), torch.full((4,), 0.5).double())


def test_guesses_take_the_extremes_and_abstain_in_between():
    scores = torch.tensor([0.3, -2.0, 5.0, 0.1, -0.4, 1.0]).numpy()
    assert guess(scores, 4).tolist() == [0, -1, 1, 0, -1, 1]


def test_without_noise_the_audit_refutes_the_claimed_epsilon(context):
    result = audit_once(context, AuditPlan(CANARIES, no_noise=True), seed=0)
    assert result["noise_multiplier"] == 0.0
    assert 0 < result["included"] < CANARIES
    assert result["correct"] == result["guesses"] == CANARIES // 2  # every guess right
    assert result["epsilon_lower_bound"] > CLAIMED
    assert result["guesses"] + result["abstained"] == CANARIES


@pytest.mark.parametrize("seed", [0, 1])
def test_with_the_real_settings_the_bound_stays_below_the_claim(context, seed):
    result = audit_once(context, AuditPlan(CANARIES), seed=seed)
    included = result["included"]
    site = context.sites[context.names[0]].n_subjects
    # the canaries are counted among the site's subjects when its noise is planned
    assert result["noise_multiplier"] == pytest.approx(
        noise_multiplier(context.setup.config, site + included)
    )
    assert result["epsilon_lower_bound"] <= CLAIMED


def test_the_audits_power_is_what_all_guesses_right_would_show():
    plan = AuditPlan(CANARIES)
    assert plan.guesses == CANARIES // 2
    assert largest_certifiable(CANARIES, plan.guesses, 1e-5) == pytest.approx(3.03, abs=0.01)
    assert AuditPlan(7).guesses == 4 and AuditPlan(7, guess_share=1.0).guesses == 6


def test_audit_options_are_refused_on_other_studies_and_bad_counts(tmp_path):
    parser = __import__("argparse").ArgumentParser()
    study_cmd.add_arguments(parser)
    for argv, message in (
        (["dp-gap", "--no-noise"], "dp-audit study only"),
        (["dp-audit", "--canaries", "1"], "--canaries: canaries must be at least 2"),
    ):
        args = parser.parse_args([*argv, "--out", str(tmp_path)])
        with pytest.raises(FedsynthError, match=message):
            study_cmd.run(args)
