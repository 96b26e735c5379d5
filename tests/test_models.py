"""Networks from the config: in-plane-only compression, attribute tokens, guidance null token."""

from __future__ import annotations

import pytest
import torch
from opacus.grad_sample.utils import prepare_module

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
    # the names checkpoints store
    assert list(tokens.state_dict()) == ["scale", "offset", "null", "mix.weight", "mix.bias"]
    values = torch.rand(3, 4)
    out = tokens(AttributeTokens.pack(values))
    assert out.shape == (3, 4, 8)
    # changing one attribute changes only its own token
    changed = values.clone()
    changed[:, 2] += 0.5
    diff = (tokens(AttributeTokens.pack(changed)) - out).abs().sum(dim=(0, 2))
    assert diff[2] > 0 and torch.all(diff[[0, 1, 3]] == 0)
    # dropped samples get the same (null) tokens whatever their values
    keep = torch.tensor([1.0, 0.0, 0.0])
    dropped = tokens(AttributeTokens.pack(values, keep))
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


def _mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (prediction - target).pow(2).flatten(1).mean(1)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost"])
@pytest.mark.parametrize("per", ["row", "attribute"])
def test_token_gradients_per_sample_equal_a_loop_whatever_is_dropped(tiny_config, mode, per):
    """Opacus' per-sample gradient (in ghost mode, its norm) of the attribute tokens equals
    one backward per row, for kept and dropped attributes alike (the null token learns)."""
    torch.manual_seed(0)
    unet = ConditionedUNet(tiny_config)
    with torch.no_grad():  # MONAI zero-initialises output layers; wake them up
        for param in unet.parameters():
            if param.dim() > 1 and not param.any():
                param.normal_(std=0.05)
    for name, param in unet.named_parameters():
        param.requires_grad_(name.startswith("tokens."))
    params = [p for p in unet.parameters() if p.requires_grad]
    n, n_attr = 6, len(tiny_config.data.attributes)
    z, target = torch.randn(2, n, *latent_shape(tiny_config))
    t, a = torch.randint(0, 100, (n,)), torch.rand(n, n_attr)
    if per == "row":
        keep = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
        dropped = keep == 0
    else:
        keep = (torch.arange(n * n_attr).reshape(n, n_attr) % 3 != 0).float()
        keep[0] = 1.0  # one row keeps every attribute, the others keep some, drop others
        dropped = (keep == 0).any(1)
        assert (keep == 1).any(1).all()
    assert dropped.any() and not dropped.all()

    def row_gradient(i: int) -> torch.Tensor:
        loss = _mse(unet(z[[i]], t[[i]], a[[i]], keep[[i]]), target[[i]]).sum()
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    loop = torch.stack([row_gradient(i) for i in range(n)])
    names = [name for name, p in unet.named_parameters() if p.requires_grad]
    sizes = [p.numel() for p in params]
    null = loop.split(sizes, dim=1)[names.index("tokens.null")]
    assert (null[dropped].abs().sum(1) > 0).all() and not null[~dropped].any()

    extra = {"max_grad_norm": 1.0} if mode == "ghost" else {}
    module = prepare_module(unet, mode, loss_reduction="sum", **extra)
    _mse(module(z, t, a, keep), target).sum().backward()
    if mode == "ghost":
        torch.testing.assert_close(module.get_norm_sample(), loop.norm(dim=1), rtol=1e-4, atol=0)
    else:
        per_sample = torch.cat([p.grad_sample.flatten(1) for p in params], dim=1)
        torch.testing.assert_close(per_sample, loop, rtol=1e-4, atol=1e-6)
    module.cleanup()
