"""Volume shapes: any slice count runs (UK Biobank's 13), in-plane sizes the autoencoder
cannot halve are refused by the config in one line."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_PRETRAIN

from fedsynth.client.dp_trainer import train_round
from fedsynth.common.anatomy import build_segmenter, voxel_counts
from fedsynth.common.checkpoint import load_pretrained
from fedsynth.common.config import ConfigError, load_config
from fedsynth.common.models import ConditionedUNet, build_autoencoder, latent_shape, padded_call
from fedsynth.common.sampling import draw_public_attributes, sample_cohort
from fedsynth.server.pretrain import pretrain

# the paper's UK Biobank short-axis size, and shapes the UNet could not halve evenly
SHAPES = [(96, 96, 13), (32, 32, 13), (36, 36, 8), (32, 32, 10), (32, 32, 5)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("preset", "shape", "divisor"),
    [("tiny", [34, 34, 13], 4), ("tiny", [32, 30, 8], 4), ("default", [95, 96, 13], 2)],
)
def test_in_plane_sizes_the_autoencoder_cannot_halve_are_refused_in_one_line(
    preset, shape, divisor
):
    with pytest.raises(ConfigError) as refused:
        load_config(preset, {"data.shape": shape})
    message = str(refused.value)
    assert f"data.shape = {shape}: in-plane size must be divisible by {divisor}," in message
    assert "\n" not in message


def test_padded_call_pads_each_axis_evenly_with_zeros_and_crops_back():
    seen = []

    def net(x: torch.Tensor) -> torch.Tensor:
        seen.append(x)
        return x * 2

    x = torch.rand(2, 3, 9, 8, 13) + 1
    torch.testing.assert_close(padded_call(net, x, 4), x * 2, rtol=0, atol=0)
    [padded] = seen
    assert padded.shape == (2, 3, 12, 8, 16)
    # 3 extra on each odd axis: 1 before, 2 after, zeros; the volume itself in between
    assert torch.equal(padded[:, :, 1:10, :, 1:14], x)
    inside = torch.zeros_like(padded, dtype=torch.bool)
    inside[:, :, 1:10, :, 1:14] = True
    assert not padded[~inside].any()
    y = torch.randn(1, 3, 8, 8, 8)
    assert padded_call(lambda t: t, y, 4) is y  # nothing to pad: the net's own output


@pytest.mark.parametrize("shape", SHAPES)
def test_every_network_runs_on_any_slice_count(tiny_config, shape):
    config = load_config("tiny", {"data.shape": list(shape)})
    volumes = torch.rand(2, 1, *shape)
    autoencoder = build_autoencoder(config).eval()
    with torch.no_grad():
        latents = autoencoder.encode_stage_2_inputs(volumes)
        assert latents.shape == (2, *latent_shape(config))
        assert autoencoder.decode_stage_2_outputs(latents).shape == volumes.shape
        unet = ConditionedUNet(config).eval()
        attributes = torch.rand(2, len(config.data.attributes))
        prediction = unet(latents, torch.tensor([1, 5]), attributes, torch.tensor([1.0, 0.0]))
        assert prediction.shape == latents.shape
    counts = voxel_counts(build_segmenter(), volumes)
    assert counts["lv"].shape == (2,)
    # and a DP-SGD step, whose per-sample gradients see the padded UNet
    result = train_round(
        unet, latents, attributes, torch.tensor([0, 1]), config, 1.0, 1.0, 1, seed=0
    )
    assert result.subjects_per_step == (2,)


def test_pretrain_and_sample_at_thirteen_slices(tmp_path, phantom_root):
    config = load_config("tiny", TINY_PRETRAIN | {"data.shape": [32, 32, 13]})
    pretrain(config, phantom_root / "public", tmp_path / "ckpt", show_progress=False)
    pretrained = load_pretrained(tmp_path / "ckpt")
    assert pretrained.config.data.shape == (32, 32, 13)
    rows = draw_public_attributes(tmp_path / "ckpt", config, 2, seed=0)
    paths = sample_cohort(
        pretrained, 2, rows, tmp_path / "out", 3.0, 2, "ddim", 0, 2, show_progress=False
    )
    for path in paths:
        data = np.asanyarray(nib.load(path).dataobj)
        assert data.shape == (32, 32, 13) and np.isfinite(data).all() and data.std() > 0
