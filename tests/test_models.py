"""Networks from the config: in-plane-only compression, attribute tokens, guidance null token."""

from __future__ import annotations

import pytest
import torch

from fedsynth.common.errors import FedsynthError
from fedsynth.common.models import (
    AttributeTokens,
    ConditionedUNet,
    build_autoencoder,
    latent_shape,
    resolve_device,
)


def test_autoencoder_compresses_in_plane_and_keeps_slices(tiny_config):
    autoencoder = build_autoencoder(tiny_config).eval()
    x = torch.rand(2, 1, *tiny_config.data.shape)
    with torch.no_grad():
        z = autoencoder.encode_stage_2_inputs(x)
        y = autoencoder.decode_stage_2_outputs(z)
    h, w, d = tiny_config.data.shape
    factor = 2 ** (len(tiny_config.autoencoder.channels) - 1)
    assert z.shape == (2, *latent_shape(tiny_config)) == (2, 3, h // factor, w // factor, d)
    assert y.shape == x.shape


def test_each_attribute_is_its_own_token_and_null_tokens_replace_dropped_ones():
    tokens = AttributeTokens(n_attributes=4, dim=8)
    values = torch.rand(3, 4)
    out = tokens(values)
    assert out.shape == (3, 4, 8)
    # changing one attribute changes only its own token
    changed = values.clone()
    changed[:, 2] += 0.5
    diff = (tokens(changed) - out).abs().sum(dim=(0, 2))
    assert diff[2] > 0 and torch.all(diff[[0, 1, 3]] == 0)
    # dropped samples get the same (null) tokens whatever their values
    keep = torch.tensor([1.0, 0.0, 0.0])
    dropped = tokens(values, keep)
    torch.testing.assert_close(dropped[1], dropped[2])
    torch.testing.assert_close(dropped[0], out[0])


def test_conditioned_unet_predicts_noise_shape_and_depends_on_attributes(tiny_config):
    torch.manual_seed(0)
    unet = ConditionedUNet(tiny_config).eval()
    with torch.no_grad():  # MONAI zero-initialises output layers; wake them up
        for param in unet.parameters():
            if param.dim() > 1 and not param.any():
                param.normal_(std=0.05)
    z = torch.randn(2, *latent_shape(tiny_config))
    t = torch.tensor([3, 50])
    a = torch.rand(2, len(tiny_config.data.attributes))
    with torch.no_grad():
        out = unet(z, t, a)
        other = unet(z, t, torch.rand_like(a))
    assert out.shape == z.shape and torch.isfinite(out).all()
    # attributes must move the prediction noticeably from the start: with tokens initialised
    # near zero (0.03% here) pretraining learned to ignore them and guidance did nothing
    assert (out - other).abs().mean() / out.abs().mean() > 0.005


def test_device_auto_and_refused_cuda():
    assert resolve_device("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(FedsynthError, match="no CUDA GPU"):
            resolve_device("cuda")
