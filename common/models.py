"""The networks, composed from MONAI parts: a 3D AutoencoderKL and a conditioned latent UNet.

Short-axis stacks have few, thick slices, so the autoencoder compresses in-plane only
(Daum et al.: 4x in-plane, slices kept). MONAI's AutoencoderKL halves every axis at each
level; `_keep_slices` turns its strided convolutions and upsamplers into in-plane ones.
Conditioning follows Daum et al.: each clinical attribute becomes its own token for the
UNet's cross-attention, and a learned null token per attribute stands in for dropped
attributes (classifier-free guidance).

MONAI's UNets halve every axis per level and concatenate skips, so an axis must be a
multiple of 2^(levels-1); short-axis stacks have any slice count (UK Biobank: 13).
`padded_call` zero-pads a network's input up to that multiple and crops its output back,
so the latent UNet (and the anatomy segmenter) run on any shape. The autoencoder's
in-plane compression cannot be padded away; the config refuses in-plane sizes it cannot
halve evenly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.networks.blocks import SpatialAttentionBlock
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from monai.networks.nets.autoencoderkl import AEKLDownsample
from monai.networks.nets.diffusion_model_unet import SpatialTransformer
from torch import nn

from fedsynth.common.config import Config
from fedsynth.common.errors import FedsynthError

ATTENTION_MODULES = (SpatialTransformer, SpatialAttentionBlock)
NORM_MODULES = (nn.GroupNorm, nn.LayerNorm)


def resolve_device(name: str) -> torch.device:
    """`auto` takes a GPU when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FedsynthError("device: cuda was asked for, but no CUDA GPU is available")
    return torch.device(name)


def _keep_slices(autoencoder: AutoencoderKL) -> AutoencoderKL:
    """Make every down/upsampling step act on the two in-plane axes only."""
    for module in autoencoder.modules():
        if isinstance(module, AEKLDownsample):
            conv = module.conv.conv
            assert isinstance(conv, nn.Conv3d)  # MONAI's Convolution, spatial_dims=3
            conv.stride = (2, 2, 1)
            # torch pads the last axis first: slices (1, 1) keep their count; in-plane (0, 1)
            module.pad.pad = (1, 1, 0, 1, 0, 1)
        elif isinstance(module, nn.Upsample):
            module.scale_factor = (2.0, 2.0, 1.0)
    return autoencoder


def build_autoencoder(config: Config) -> AutoencoderKL:
    """The 3D AutoencoderKL of the config, compressing 2^(levels-1) in-plane only."""
    cfg = config.autoencoder
    autoencoder = AutoencoderKL(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=cfg.channels,
        attention_levels=cfg.attention_levels,
        latent_channels=cfg.latent_channels,
        num_res_blocks=cfg.num_res_blocks,
        norm_num_groups=cfg.norm_num_groups,
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    )
    return _keep_slices(autoencoder)


def latent_shape(config: Config) -> tuple[int, int, int, int]:
    """(channels, H, W, slices) of a latent."""
    factor = 2 ** (len(config.autoencoder.channels) - 1)
    h, w, d = config.data.shape
    return (config.autoencoder.latent_channels, h // factor, w // factor, d)


def padded_call(
    net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, multiple: int
) -> torch.Tensor:
    """net(x) for x (B, C, *spatial) of any size: each spatial axis is zero-padded evenly on
    both sides up to a multiple of `multiple`, and the output cropped back to x's size.

    An input already of such a size runs unpadded (bit-identical to calling net).
    """
    spatial = x.shape[2:]
    extra = [-size % multiple for size in spatial]
    if not any(extra):
        return net(x)
    before = [e // 2 for e in extra]
    pad = [n for e, b in zip(reversed(extra), reversed(before), strict=True) for n in (b, e - b)]
    out = net(nn.functional.pad(x, pad))
    crop = [slice(b, b + size) for b, size in zip(before, spatial, strict=True)]
    return out[(slice(None), slice(None), *crop)]


class AttributeTokens(nn.Module):
    """One token per attribute: value * direction + offset, each attribute its own.

    A dropped attribute (keep 0) is replaced by that attribute's learned null token, so the
    UNet learns an unconditional model alongside the conditional one.

    Values and keep-mask arrive as ONE tensor (`pack`): Opacus recomputes a layer it has no
    grad sampler for from the layer's first forward input alone (its functorch path, used in
    hooks, functorch and ghost modes alike), so a mask passed as a second input was lost and
    a dropped row got a kept row's per-sample gradient.
    """

    def __init__(self, n_attributes: int, dim: int) -> None:
        super().__init__()
        # unit-scale, like nn.Embedding: with small tokens the cross-attention sees nearly
        # the same context whatever the attributes, and training learned to ignore them
        self.scale = nn.Parameter(torch.randn(n_attributes, dim))
        self.offset = nn.Parameter(torch.randn(n_attributes, dim))
        self.null = nn.Parameter(torch.randn(n_attributes, dim))
        self.mix = nn.Linear(dim, dim)

    @staticmethod
    def pack(values: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, A, 2): values (B, A) in [0, 1] beside keep (B,) or (B, A), 1 = use, 0 = null.

        No keep means every attribute is used.
        """
        if keep is None:
            keep = torch.ones_like(values)
        else:
            keep = keep.to(values.dtype)
            keep = (keep[:, None] if keep.dim() == 1 else keep).expand_as(values)
        return torch.stack([values, keep], dim=-1)

    def forward(self, conditions: torch.Tensor) -> torch.Tensor:
        """conditions (B, A, 2) from `pack` -> tokens (B, A, dim)."""
        values, keep = conditions.unbind(-1)
        keep = keep.unsqueeze(-1)
        tokens = values.unsqueeze(-1) * self.scale + self.offset
        tokens = keep * tokens + (1 - keep) * self.null
        return self.mix(torch.nn.functional.silu(tokens)) + tokens


class ConditionedUNet(nn.Module):
    """MONAI DiffusionModelUNet whose cross-attention context is the attribute tokens."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        cfg = config.unet
        channels = config.autoencoder.latent_channels
        self.tokens = AttributeTokens(len(config.data.attributes), cfg.token_dim)
        self.multiple = 2 ** (len(cfg.channels) - 1)  # every axis halves at each level
        self.unet = DiffusionModelUNet(
            spatial_dims=3,
            in_channels=channels,
            out_channels=channels,
            channels=cfg.channels,
            attention_levels=cfg.attention_levels,
            num_res_blocks=cfg.num_res_blocks,
            num_head_channels=cfg.num_head_channels,
            norm_num_groups=cfg.norm_num_groups,
            with_conditioning=True,
            cross_attention_dim=cfg.token_dim,
        )

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        attributes: torch.Tensor,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, C, H, W, D) of any size, timesteps (B,), attributes (B, A), keep (B,) or
        (B, A) or None -> prediction shaped like x (padded for the UNet, cropped back)."""
        context = self.tokens(AttributeTokens.pack(attributes, keep))
        return padded_call(
            lambda padded: self.unet(padded, timesteps, context=context), x, self.multiple
        )


def trainable_names(unet: ConditionedUNet, trainable: str) -> list[str]:
    """The parameter names (state-dict keys, in state-dict order) of `privacy.trainable`:
    what DP-SGD trains at a site and all that travels between server and sites (the
    rest is the public checkpoint both hold). Raises FedsynthError for an unknown subset.

    "attention": MONAI's attention blocks (SpatialTransformer: cross-attention on the
    attribute tokens, with its norms and projections) plus the AttributeTokens, i.e. every
    path through which the attributes reach the prediction.
    "norms": the scale and shift of every normalisation layer (GroupNorm, LayerNorm) plus
    the AttributeTokens: about 0.3% of the UNet, setting each channel's gain and offset at
    every level, which is where scanners differ (contrast, gain, noise); DP noise grows
    with the square root of the trained dimensions, so these few move most per epsilon
    (the BitFit / DP-BiTFiT finding: Zaken et al. 2022, Bu et al. 2024).
    "norms+attention": both (the attention blocks' own norms once).
    Every subset trains the AttributeTokens, so conditioning adapts with it.
    """
    if trainable == "all":
        chosen = list(unet.parameters())
    elif trainable in ("attention", "norms", "norms+attention"):
        chosen = list(unet.tokens.parameters())
        for module in unet.unet.modules():
            if trainable != "norms" and isinstance(module, ATTENTION_MODULES):
                chosen += list(module.parameters())
            if trainable != "attention" and isinstance(module, NORM_MODULES):
                chosen += list(module.parameters(recurse=False))
    else:
        raise FedsynthError(
            f"privacy.trainable must be all, attention, norms or norms+attention, got {trainable!r}"
        )
    ids = {id(p) for p in chosen}  # by identity: tensors compare by value
    return [name for name, p in unet.named_parameters() if id(p) in ids]
