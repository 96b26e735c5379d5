"""Public pretraining: a complete checkpoint folder, and a run killed mid-stage that resumes
exactly."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from fedsynth.common.checkpoint import load_pretrained, load_torch
from fedsynth.common.config import config_hash, load_config
from fedsynth.common.data import open_site
from fedsynth.common.errors import FedsynthError
from fedsynth.common.lr_schedule import COSINE_FLOOR, pretraining_schedule
from fedsynth.server.pretrain import pretrain
from fedsynth.simulations.phantoms import generate_cohorts

OVERRIDES = {"autoencoder.steps": 12, "training.pretrain-steps": 12}


@pytest.fixture(scope="module")
def public(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    generate_cohorts(out, sites=1, subjects=2, seed=0, progress=False)
    return out / "public"


def test_pretrain_writes_a_complete_checkpoint(tmp_path, public):
    config = load_config("tiny", OVERRIDES)
    metadata = pretrain(config, public, tmp_path / "ckpt", show_progress=False)
    assert metadata["config_hash"] == config_hash(config)
    assert metadata["autoencoder_steps"] == metadata["unet_steps"] == 12
    assert metadata["public_subjects"] == 4 and metadata["public_volumes"] == 8
    assert metadata["versions"]["monai"] and len(metadata["data_manifest_sha256"]) == 64
    assert metadata["volume_meter"]["lv"]["n"] == 8  # public phantoms carry label maps
    for name in (
        "autoencoder.pt",
        "unet.pt",
        "config.yaml",
        "loss_curves.png",
        "public_attributes.csv",
        "volume_meter.pt",
    ):
        assert (tmp_path / "ckpt" / name).stat().st_size > 0
    loaded = load_pretrained(tmp_path / "ckpt")
    assert loaded.config == config
    assert loaded.metadata["latent_std"] == pytest.approx(metadata["latent_std"])
    assert all(torch.isfinite(p).all() for p in loaded.unet.parameters())
    # the UNet's latents: the public volumes encoded are zero-mean, unit-std per channel
    dataset, _ = open_site(public, config.data, show_progress=False)
    latents = loaded.encode(torch.stack([dataset[i][0] for i in range(len(dataset))]))
    assert latents.shape[1:] == (3, 8, 8, 8)
    assert latents.mean((0, 2, 3, 4)).abs().max() < 1e-4
    assert latents.std((0, 2, 3, 4)) == pytest.approx([1.0] * 3, abs=1e-4)
    assert loaded.decode(latents).shape[1:] == (1, *config.data.shape)
    # a second run in the same folder with another config is refused, nothing overwritten
    before = (tmp_path / "ckpt" / "unet.pt").read_bytes()
    with pytest.raises(FedsynthError, match="holds pretraining of another config"):
        pretrain(load_config("tiny"), public, tmp_path / "ckpt", show_progress=False)
    assert (tmp_path / "ckpt" / "unet.pt").read_bytes() == before


def test_with_ema_the_checkpoint_holds_the_moving_average_not_the_last_step(tmp_path, public):
    config = load_config("tiny", {**OVERRIDES, "training.pretrain-ema-decay": 0.8})
    pretrain(config, public, tmp_path / "ckpt", show_progress=False)
    saved = load_torch(tmp_path / "ckpt" / "unet.pt")
    state = load_torch(tmp_path / "ckpt" / "state" / "unet.pt")
    assert int(state["ema"]["n_averaged"]) == OVERRIDES["training.pretrain-steps"]
    average = {k.removeprefix("module."): v for k, v in state["ema"].items() if k != "n_averaged"}
    assert set(average) == set(saved)
    assert all(torch.equal(saved[k], average[k]) for k in saved)
    assert any(not torch.equal(saved[k], state["model"][k]) for k in saved)  # not the last
    assert load_pretrained(tmp_path / "ckpt").config.training.pretrain_ema_decay == 0.8


RUN = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    import fedsynth.server.pretrain as p
    from fedsynth.common.config import load_config
    p.SAVE_EVERY_SECONDS = 0.0  # save after every step, so a kill can land anywhere
    config = load_config("tiny", {overrides!r})
    p.pretrain(config, sys.argv[1], sys.argv[2], show_progress=False)
    """
)


# the resumed runs keep a moving average and a warmup + cosine rate too: both must survive
# the kill as the weights do (a schedule restarted from its warmup changes every later step)
RESUMED = {
    **OVERRIDES,
    "training.pretrain-ema-decay": 0.8,
    "training.pretrain-warmup-steps": 4,
    "training.pretrain-schedule": "cosine",
}


def run_pretrain(public: Path, out: Path) -> subprocess.Popen:
    script = RUN.format(overrides=RESUMED)
    return subprocess.Popen([sys.executable, "-c", script, str(public), str(out)])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, public) -> Path:
    """An uninterrupted run, in a process of its own like the killed ones."""
    out = tmp_path_factory.mktemp("reference")
    assert run_pretrain(public, out).wait(timeout=300) == 0
    return out


@pytest.mark.parametrize("stage", ["autoencoder.pt", "unet.pt"])
def test_killed_pretraining_resumes_without_repeating_or_skipping(
    tmp_path, public, reference, stage
):
    killed = tmp_path / "killed"
    proc = run_pretrain(public, killed)
    state = killed / "state" / stage
    deadline = time.monotonic() + 300
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # the kill landed inside the stage (some of its steps saved, not all), after the
    # stages before it had finished
    steps = {
        "autoencoder.pt": OVERRIDES["autoencoder.steps"],
        "unet.pt": OVERRIDES["training.pretrain-steps"],
    }
    done = len(load_torch(state)["losses"])
    assert 0 < done < steps[stage], f"{stage}: killed after {done} of {steps[stage]} steps"
    if stage == "unet.pt":
        ae_done = load_torch(killed / "state" / "autoencoder.pt")["losses"]
        assert len(ae_done) == steps["autoencoder.pt"]
    assert run_pretrain(public, killed).wait(timeout=300) == 0
    for name in ("autoencoder.pt", "unet.pt"):
        resumed = load_torch(killed / "state" / name)["losses"]
        expected = load_torch(reference / "state" / name)["losses"]
        assert len(resumed) == 12
        assert resumed == pytest.approx(expected, rel=1e-4)
    resumed_unet = load_torch(killed / "unet.pt")
    reference_unet = load_torch(reference / "unet.pt")
    for key, value in reference_unet.items():
        assert torch.allclose(resumed_unet[key], value, rtol=1e-4, atol=1e-6), key
    meta = json.loads((killed / "metadata.json").read_text())
    assert meta["latent_std"] == pytest.approx(
        json.loads((reference / "metadata.json").read_text())["latent_std"], rel=1e-4
    )


def test_the_pretraining_rate_warms_up_then_follows_its_schedule():
    def rates(steps: int, warmup: int, schedule: str) -> list[float]:
        overrides = {
            "training.pretrain-steps": steps,
            "training.pretrain-warmup-steps": warmup,
            "training.pretrain-schedule": schedule,
            "training.pretrain-learning-rate": 2e-3,
        }
        training = load_config("tiny", overrides).training
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
        schedule_ = pretraining_schedule(optimizer, training)
        seen = []
        for _ in range(steps):  # the rate each step uses, then the step
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            if schedule_ is not None:
                schedule_.step()
        return seen

    cosine = rates(100, 10, "cosine")
    assert cosine[0] == pytest.approx(2e-3 / 10)  # warmup from 1/10 of the peak
    assert cosine[:11] == sorted(cosine[:11]) and cosine[10] == pytest.approx(2e-3)
    after = cosine[10:]
    assert all(a > b for a, b in itertools.pairwise(after))  # falls every step
    assert after[45] == pytest.approx((2e-3 + COSINE_FLOOR * 2e-3) / 2, rel=0.01)  # halfway
    assert COSINE_FLOOR * 2e-3 < after[-1] < 1.05 * COSINE_FLOOR * 2e-3  # to the floor
    constant = rates(100, 10, "constant")
    assert constant[:10] == pytest.approx(cosine[:10]) and set(constant[10:]) == {2e-3}
    assert set(rates(20, 0, "constant")) == {2e-3}
    plain = load_config("tiny").training  # constant, no warmup: nothing is scheduled
    assert (
        pretraining_schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))]), plain) is None
    )
