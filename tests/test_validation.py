"""Per-round validation: public held-out data only, comparable across rounds, a real montage."""

from __future__ import annotations

import torch
from PIL import Image

from fedsynth.common.checkpoint import load_pretrained
from fedsynth.common.config import load_config
from fedsynth.server.validation import Validator


def test_validation_loss_is_repeatable_and_tracks_the_weights(
    tmp_path, tiny_checkpoint, phantom_root
):
    config = load_config("tiny", {"sampling.steps": 3, "device": "cpu"})
    validator = Validator(tiny_checkpoint, phantom_root / "public", config)
    weights = load_pretrained(tiny_checkpoint).unet.state_dict()
    first = validator(weights, tmp_path / "round-001.png")
    again = validator(weights, tmp_path / "again.png")
    assert first == again  # the same noise and timesteps every round: comparable
    broken = {
        k: v + 0.5 * torch.randn_like(v) if v.is_floating_point() else v for k, v in weights.items()
    }
    assert validator(broken, tmp_path / "broken.png") > first
    image = Image.open(tmp_path / "round-001.png")
    assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 300
