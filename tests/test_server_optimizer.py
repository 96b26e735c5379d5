"""The server's step on the sites' mean delta: FedAvg (sgd at rate 1) and FedAdam.

FedAdam must be Adam on minus the mean delta, with its moments carried across rounds and
across a resume (saved with a round's checkpoint); a server that forgot them, or stepped
along the delta's negative, would fail here.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedsynth.common.config import load_config
from fedsynth.server.server_optimizer import ADAM_BETAS, ADAM_EPS, ServerOptimizer

DELTAS = [
    {"w": torch.tensor([0.02, -0.01, 0.0, 0.005]), "n": torch.tensor([3.0])},
    {"w": torch.tensor([0.01, 0.01, -0.02, 0.005]), "n": torch.tensor([-1.0])},
    {"w": torch.tensor([-0.03, 0.02, 0.01, 0.0]), "n": torch.tensor([2.0])},
]


def _weights() -> dict[str, torch.Tensor]:
    return {
        "w": torch.tensor([1.0, -1.0, 0.5, 0.0]),
        "n": torch.tensor([0.1]),
        "count": torch.tensor(7),
    }


def _optimizer(kind: str, rate: float, weights) -> ServerOptimizer:
    config = load_config(
        "tiny", {"federation.server-optimizer": kind, "federation.server-learning-rate": rate}
    )
    return ServerOptimizer(config.federation, weights)


def _adam_by_hand(x: float, deltas: list[float], lr: float | list[float]) -> float:
    """Kingma & Ba's Adam (bias-corrected) on the pseudo-gradient -delta, in float64;
    `lr` one rate, or one per step."""
    (b1, b2), m, v = ADAM_BETAS, 0.0, 0.0
    rates = lr if isinstance(lr, list) else [lr] * len(deltas)
    for t, (d, lr) in enumerate(zip(deltas, rates, strict=True), 1):
        g = -d
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        x -= lr * (m / (1 - b1**t)) / (math.sqrt(v / (1 - b2**t)) + ADAM_EPS)
    return x


def test_sgd_at_rate_one_is_fedavg_and_leaves_counters_alone():
    weights = _weights()
    server = _optimizer("sgd", 1.0, weights)
    server.step(weights, DELTAS[0])
    assert torch.allclose(weights["w"], _weights()["w"] + DELTAS[0]["w"])
    assert torch.equal(weights["count"], torch.tensor(7))


def test_fedadam_is_adam_on_minus_the_mean_delta_over_rounds():
    weights, lr = _weights(), 0.01
    server = _optimizer("adam", lr, weights)
    for delta in DELTAS:
        server.step(weights, delta)
    for key in ("w", "n"):
        for i, start in enumerate(_weights()[key].tolist()):
            want = _adam_by_hand(start, [float(d[key][i]) for d in DELTAS], lr)
            assert weights[key][i].item() == pytest.approx(want, abs=1e-6), (key, i)
    # the first step alone: lr in the direction of the delta, whatever its size
    first = _weights()
    _optimizer("adam", lr, first).step(first, DELTAS[0])
    moved = first["w"] - _weights()["w"]
    assert torch.allclose(moved, torch.tensor([lr, -lr, 0.0, lr]), atol=1e-7)
    assert torch.equal(weights["count"], torch.tensor(7))


def test_fedadam_resumes_with_the_moments_it_saved(tmp_path):
    lr = 0.01
    straight = _weights()
    server = _optimizer("adam", lr, straight)
    for delta in DELTAS:
        server.step(straight, delta)

    first = _weights()
    before_crash = _optimizer("adam", lr, first)
    before_crash.step(first, DELTAS[0])
    before_crash.save(tmp_path)
    resumed = _optimizer("adam", lr, first)  # a new process: weights from the checkpoint
    assert resumed.load(tmp_path)
    for delta in DELTAS[1:]:
        resumed.step(first, delta)
    for key in ("w", "n"):
        torch.testing.assert_close(first[key], straight[key], rtol=0, atol=0)

    forgetful = _weights()  # fresh moments after round 1 (what a lost state would give)
    _optimizer("adam", lr, forgetful).step(forgetful, DELTAS[0])
    fresh = _optimizer("adam", lr, forgetful)
    for delta in DELTAS[1:]:
        fresh.step(forgetful, delta)
    assert not torch.equal(forgetful["w"], straight["w"])


def test_sgd_saves_nothing_and_loads_nothing(tmp_path):
    weights = _weights()
    server = _optimizer("sgd", 2.0, weights)
    server.save(tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert not server.load(tmp_path)


def test_a_resumed_study_strategy_continues_the_saved_moments(tmp_path):
    """The strategy of a study resumed after round 1 loads round 1's FedAdam state."""
    from test_secure_aggregation import WEIGHTS, _study

    from fedsynth.server.run_dir import round_dir
    from fedsynth.server.strategy import StudyStrategy

    study = _study(tmp_path, secure=False, rate=0.01, optimizer="adam")
    keys = [k for k in WEIGHTS if WEIGHTS[k].is_floating_point()]
    weights = {k: v.clone() for k, v in WEIGHTS.items()}
    first = ServerOptimizer(study.config.federation, {k: weights[k] for k in keys})
    first.step(weights, {k: torch.full_like(weights[k], 0.02) for k in keys})
    folder = round_dir(study.run_dir, 1)
    folder.mkdir(parents=True)
    first.save(folder)
    resumed = StudyStrategy(study, weights, done=1, keys=keys)
    saved, loaded = first.adam.state_dict(), resumed.server_optimizer.adam.state_dict()
    assert loaded["state"][0]["step"] == saved["state"][0]["step"] == 1
    for index, moments in saved["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(loaded["state"][index][name], moments[name])


def test_a_resume_at_a_lower_rate_steps_at_that_rate(tmp_path):
    """torch restores a saved optimiser's rate; a resume that lowers
    federation.server-learning-rate (e.g. after a divergence) must step at the new one."""
    weights = _weights()
    first = _optimizer("adam", 0.01, weights)
    first.step(weights, DELTAS[0])
    first.save(tmp_path)
    slower = _optimizer("adam", 0.001, weights)
    assert slower.load(tmp_path)
    slower.step(weights, DELTAS[1])
    for i, start in enumerate(_weights()["w"].tolist()):
        want = _adam_by_hand(start, [float(d["w"][i]) for d in DELTAS[:2]], [0.01, 0.001])
        assert weights["w"][i].item() == pytest.approx(want, abs=1e-7), i


def test_moments_saved_for_other_tensors_are_not_loaded(tmp_path):
    """A resume whose travelling tensors changed (another privacy.trainable) starts fresh
    moments instead of failing on a missing key."""
    saved = _optimizer("adam", 0.01, {"w": torch.zeros(4)})
    saved.step({"w": torch.zeros(4)}, {"w": torch.ones(4)})
    saved.save(tmp_path)
    assert not _optimizer("adam", 0.01, _weights()).load(tmp_path)


def test_a_failed_validation_is_logged_and_a_failing_study_drops_queued_ones(
    tmp_path, caplog, monkeypatch
):
    """Validation runs beside the rounds: its failure is one line, not the study's end;
    when the study itself fails, rounds still queued for validation are not validated."""
    import threading

    from test_secure_aggregation import WEIGHTS, _study

    from fedsynth.server.round_validation import RoundValidation

    validation = RoundValidation(_study(tmp_path, secure=False))
    validation.validator = object()  # as if public validation data were named
    running, release, validated = threading.Event(), threading.Event(), []

    def validate(round_number, weights):
        if round_number == 1:
            running.set()
            release.wait(10)
            raise RuntimeError("no such volume")
        validated.append(round_number)
        return {}

    monkeypatch.setattr(validation, "validate", validate)
    validation.later(1, dict(WEIGHTS))
    validation.later(2, dict(WEIGHTS))
    assert running.wait(10)
    release.set()
    validation.finish()
    out = caplog.text
    assert "round 1 validation failed: RuntimeError: no such volume" in out
    assert validated == [2]  # the next round was still validated

    release.clear()
    validated.clear()
    running.clear()
    validation.later(1, dict(WEIGHTS))  # blocks until released
    validation.later(2, dict(WEIGHTS))
    assert running.wait(10)
    threading.Timer(0.5, release.set).start()
    validation.finish(cancel=True)
    assert validated == []  # round 2 was dropped, round 1 finished (and failed) first
