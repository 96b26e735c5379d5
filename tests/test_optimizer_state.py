"""A site keeps its optimiser's moments between rounds: in its state dir, per study."""

from __future__ import annotations

import dataclasses
import logging
import stat

import pytest
import torch

from fedsynth.client import dp_trainer
from fedsynth.client.node_config import SiteSettings
from fedsynth.client.optimizer_state import state_path
from fedsynth.client.site_round import run_site_round
from fedsynth.common.checkpoint import load_pretrained, public_sha256
from fedsynth.common.config import config_from_dict, load_config, to_dict
from fedsynth.common.models import ConditionedUNet, latent_shape
from fedsynth.simulations import federated

pytestmark = pytest.mark.usefixtures("one_thread")

SUBJECTS = torch.arange(6)
STUDY = {
    "privacy.delta": 0.1,
    "privacy.batch-size": 1,
    "privacy.target-epsilon": 8.0,
    "federation.rounds": 3,
}


def norms_config(tiny_config, keep: str = "keep"):
    training = dataclasses.replace(tiny_config.training, finetune_optimizer_state=keep)
    privacy = dataclasses.replace(tiny_config.privacy, trainable="norms")
    return dataclasses.replace(tiny_config, training=training, privacy=privacy)


def site_data(config, n: int = 6):
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn((n, *latent_shape(config)), generator=generator)
    return latents, torch.rand((n, len(config.data.attributes)), generator=generator)


def a_round(config, unet, steps: int, seed: int, noise: float = 20.0, **kwargs):
    latents, attributes = site_data(config)
    return dp_trainer.train_round(
        unet, latents, attributes, SUBJECTS, config, noise, 1.0, steps, seed=seed, **kwargs
    )


def steps_of(state: dict) -> set[float]:
    return {float(slots["step"]) for slots in state["state"].values()}


def flat(unet: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in unet.parameters()])


def test_a_kept_state_continues_adamw_where_the_last_round_left_it(tiny_config):
    """With noise far above the gradients, a fresh AdamW's first step moves every trained
    weight by the full rate (the sign of that step's noise); continued from the moments of
    8 earlier noisy steps, the same step is a fraction of it: the noise is averaged."""
    config = norms_config(tiny_config)
    torch.manual_seed(0)
    unet = ConditionedUNet(config)
    first = a_round(config, unet, steps=8, seed=1)
    assert steps_of(first.optimizer_state) == {8.0}
    start = {k: v.clone() for k, v in unet.state_dict().items()}

    def one_step(kept):
        unet.load_state_dict(start)
        before = flat(unet)
        result = a_round(config, unet, 1, 2, optimizer_state=kept, learning_rate=2e-3)
        return (flat(unet) - before).abs(), result

    fresh, _ = one_step(None)
    continued, result = one_step(first.optimizer_state)
    moved = fresh > 0
    assert moved.sum() > 100
    assert fresh[moved].median() == pytest.approx(2e-3, rel=0.02)  # lr x sign
    assert continued[moved].median() < 0.6 * 2e-3
    assert steps_of(result.optimizer_state) == {9.0}
    # the round's own rate, not the rate the state was kept at
    assert {g["lr"] for g in result.optimizer_state["param_groups"]} == {2e-3}


def test_a_state_kept_for_other_weights_is_not_used(tiny_config, caplog):
    config = norms_config(tiny_config)
    torch.manual_seed(0)
    unet = ConditionedUNet(config)
    start = {k: v.clone() for k, v in unet.state_dict().items()}
    other = dataclasses.replace(
        config, privacy=dataclasses.replace(config.privacy, trainable="attention")
    )
    kept = a_round(other, unet, steps=2, seed=1).optimizer_state
    sgd = dataclasses.replace(config.training, finetune_optimizer="sgd")
    kept_by_sgd = a_round(dataclasses.replace(config, training=sgd), unet, 2, 1).optimizer_state
    unet.load_state_dict(start)
    a_round(config, unet, steps=2, seed=3)
    fresh = flat(unet)
    for wrong in (kept, kept_by_sgd):
        unet.load_state_dict(start)
        with caplog.at_level(logging.WARNING, logger="fedsynth.client.dp_trainer"):
            result = a_round(config, unet, steps=2, seed=3, optimizer_state=wrong)
        assert "starts it fresh" in caplog.text
        caplog.clear()
        assert torch.equal(flat(unet), fresh)
        assert steps_of(result.optimizer_state) == {2.0}


def test_a_site_keeps_its_state_per_study_owner_only(tmp_path, phantom_root, tiny_checkpoint):
    config = load_config("tiny", STUDY)
    assert config.training.finetune_optimizer_state == "keep"  # the presets' default
    state_dir = tmp_path / "state"
    site = SiteSettings("site-1", phantom_root / "site-1", state_dir, 100.0)
    weights = load_pretrained(tiny_checkpoint).unet.state_dict()
    sha = public_sha256(tiny_checkpoint, {}, [])

    def round_of(study: str, number: int, chosen=config):
        return run_site_round(
            site,
            chosen,
            tiny_checkpoint,
            weights,
            number,
            seed=number,
            study_id=study,
            checkpoint_sha256=sha,
        )

    steps = config.privacy.local_steps
    first = round_of("study-a", 1)
    path = state_path(state_dir, "study-a")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert steps_of(first.result.optimizer_state) == {float(steps)}
    second = round_of("study-a", 2)
    assert steps_of(second.result.optimizer_state) == {2.0 * steps}
    other = round_of("study-b", 1)  # another study at the same site starts its own
    assert steps_of(other.result.optimizer_state) == {float(steps)}
    assert state_path(state_dir, "study-b") != path
    # a file that cannot be read is logged and replaced; the round still trains
    path.write_bytes(b"not a torch file")
    third = round_of("study-a", 3)
    assert steps_of(third.result.optimizer_state) == {float(steps)}
    assert steps_of(torch.load(path, weights_only=True)) == {float(steps)}
    fresh = load_config("tiny", {**STUDY, "training.finetune-optimizer-state": "fresh"})
    round_of("study-c", 1, fresh)
    assert not state_path(state_dir, "study-c").exists()


def test_the_federation_hands_each_site_its_own_state(tiny_config, monkeypatch):
    config = norms_config(tiny_config)
    config = dataclasses.replace(
        config, federation=dataclasses.replace(config.federation, rounds=3)
    )
    latents, attributes = site_data(config)
    sites = {name: federated.SiteLatents(latents, attributes, SUBJECTS) for name in ("a", "b")}
    given: list[tuple[int, dict | None]] = []
    real = federated.train_round

    def recording(*args, **kwargs):
        kept = kwargs.get("optimizer_state")
        given.append((0 if kept is None else max(steps_of(kept)), kept))
        return real(*args, **kwargs)

    monkeypatch.setattr(federated, "train_round", recording)
    torch.manual_seed(0)
    unet = ConditionedUNet(config)
    federated.federate(config, unet.state_dict(), unet, sites)
    steps = config.privacy.local_steps
    assert [s for s, _ in given] == [0, 0, steps, steps, 2 * steps, 2 * steps]
    assert given[2][1] is not given[3][1]  # site b's own moments, not site a's
    given.clear()
    fresh = norms_config(config, keep="fresh")
    federated.federate(fresh, unet.state_dict(), unet, sites)
    assert [s for s, _ in given] == [0] * 6


def test_a_config_saved_before_the_key_existed_starts_fresh_each_round():
    raw = to_dict(load_config("default"))
    del raw["training"]["finetune-optimizer-state"]
    assert config_from_dict(raw).training.finetune_optimizer_state == "fresh"
