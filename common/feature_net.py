"""Feature networks for fidelity metrics, trained on PUBLIC volumes only.

Frechet distance and kernel MMD compare two cohorts in a feature space. The papers use
Inception (2D, ImageNet) or MedicalNet (3D) features; no weights can be downloaded here,
so the project trains its own: a small 3D MONAI ResNet that predicts a public volume's
attributes (scaled by their declared ranges), and a 2D one (the 2.5D variant) that
predicts, from one short-axis slice, the volume's attributes and the slice's relative
position (0 base, 1 apex). The globally pooled activations before each network's last
linear layer are the features. Numbers computed on them compare only within fedsynth
(same checkpoint, same feature_net.pt), never with a paper's FID.

Only public data is read (it carries no DP claim). Training is seeded and runs once per
checkpoint: `ensure_feature_net` leaves an existing feature_net.pt alone.
Cost (2-core CPU, one thread, default 32x32x8 and 300 steps): about a minute.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.networks.nets import ResNet

from fedsynth.common.checkpoint import load_torch, save_torch
from fedsynth.common.config import Config
from fedsynth.common.data import open_site
from fedsynth.common.errors import FedsynthError
from fedsynth.common.progress import progress

FEATURE_NET = "feature_net.pt"
LAYERS = (1, 1, 1, 1)  # one basic residual block per stage
WIDTHS = (8, 16, 32, 32)  # the last one is the feature dimension
VOLUME_BATCH, SLICE_BATCH = 8, 32
LEARNING_RATE = 1e-3


def feature_net_path(checkpoint: str | Path) -> Path:
    """Where a checkpoint folder keeps its feature networks."""
    return Path(checkpoint).expanduser() / FEATURE_NET


def build_trunk(
    spatial_dims: int, stem_stride: int | tuple[int, ...], widths: tuple[int, ...] = WIDTHS
) -> ResNet:
    """A small MONAI ResNet without its classifier: (B, 1, *spatial) -> (B, widths[-1])."""
    return ResNet(
        "basic",
        list(LAYERS),
        list(widths),
        spatial_dims=spatial_dims,
        n_input_channels=1,
        conv1_t_size=3,
        # MONAI annotates tuple[int] (a 1-tuple); it takes one stride per spatial axis
        conv1_t_stride=stem_stride,  # type: ignore[arg-type]
        no_max_pool=True,
        feed_forward=False,
    )


def _stem_stride(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Halve large in-plane grids at the first convolution (96x96 costs 9x 32x32 otherwise);
    slices are few, so the slice axis keeps its resolution."""
    return (2, 2, 1) if min(shape[:2]) >= 64 else (1, 1, 1)


def _slices(volumes: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W, D) -> (N*D, 1, H, W), volume-major: slice k of volume i at i*D + k."""
    n, c, h, w, d = volumes.shape
    return volumes.permute(0, 4, 1, 2, 3).reshape(n * d, c, h, w)


@dataclass
class FeatureNets:
    """Both trunks (eval mode) and what they were trained on (`info`)."""

    volume_trunk: torch.nn.Module
    slice_trunk: torch.nn.Module
    info: dict

    @torch.no_grad()
    def volume_features(self, volumes: torch.Tensor, batch: int = 16) -> torch.Tensor:
        """Volumes (N, 1, H, W, D) in [0, 1] at the trained shape -> features (N, F)."""
        self._check(volumes)
        return torch.cat(
            [self.volume_trunk(volumes[i : i + batch]) for i in range(0, len(volumes), batch)]
        )

    @torch.no_grad()
    def slice_features(self, volumes: torch.Tensor, batch: int = 16) -> torch.Tensor:
        """Volumes (N, 1, H, W, D) -> features (N*D, F2) of every short-axis slice,
        volume-major (slice k of volume i is row i*D + k)."""
        self._check(volumes)
        return torch.cat(
            [
                self.slice_trunk(_slices(volumes[i : i + batch]))
                for i in range(0, len(volumes), batch)
            ]
        )

    def _check(self, volumes: torch.Tensor) -> None:
        shape = tuple(self.info["shape"])
        if volumes.dim() != 5 or volumes.shape[1] != 1 or tuple(volumes.shape[2:]) != shape:
            raise FedsynthError(
                f"feature nets take (N, 1, {', '.join(map(str, shape))}) volumes, "
                f"got {tuple(volumes.shape)}"
            )


def fit_regressor(
    spatial_dims: int,
    stem_stride: tuple[int, ...],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    steps: int,
    batch: int,
    seed: int,
    name: str,
    show_progress: bool,
    start: torch.nn.Sequential | None = None,
) -> tuple[torch.nn.Sequential, list[float]]:
    """Fit a new trunk + linear head (or a copy of `start`, a regressor this function
    returned: finetuning) to `targets` (N, T) by MSE with Adam, on batches drawn with
    replacement; `seed` fixes the initial weights and the batches. Returns the regressor
    (trunk then head, in eval mode) and the loss of every step."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    trunk: torch.nn.Module
    head: torch.nn.Module
    if start is None:
        trunk = build_trunk(spatial_dims, stem_stride)
        head = torch.nn.Linear(WIDTHS[-1], targets.shape[1])
    else:
        trunk, head = copy.deepcopy(start[0]), copy.deepcopy(start[1])
    params = [*trunk.parameters(), *head.parameters()]
    optimizer = torch.optim.Adam(params, lr=LEARNING_RATE)
    losses = []
    trunk.train()
    for _ in progress(range(steps), name, show_progress):
        index = torch.randint(0, len(inputs), (min(batch, len(inputs)),), generator=generator)
        loss = torch.nn.functional.mse_loss(head(trunk(inputs[index])), targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return torch.nn.Sequential(trunk, head).eval(), losses


def train_feature_nets(
    volumes: torch.Tensor,
    attributes: torch.Tensor,
    steps: int,
    seed: int,
    show_progress: bool = True,
) -> tuple[FeatureNets, dict]:
    """Train both trunks on public volumes (N, 1, H, W, D) in [0, 1] and their scaled
    attributes (N, A); returns the nets and a state dict for `save_torch`."""
    if len(volumes) < 2:
        raise FedsynthError(f"feature nets need at least 2 public volumes, got {len(volumes)}")
    shape = tuple(int(s) for s in volumes.shape[2:])
    stride = _stem_stride(shape)
    volume_net, volume_losses = fit_regressor(
        3,
        stride,
        volumes,
        attributes,
        steps,
        VOLUME_BATCH,
        seed,
        "feature net 3D",
        show_progress,
    )
    depth = shape[2]
    position = torch.arange(depth, dtype=torch.float32) / max(depth - 1, 1)
    slice_targets = torch.cat(
        [attributes.repeat_interleave(depth, 0), position.repeat(len(volumes))[:, None]], dim=1
    )
    slice_net, slice_losses = fit_regressor(
        2,
        stride[:2],
        _slices(volumes),
        slice_targets,
        steps,
        SLICE_BATCH,
        seed + 1,
        "feature net 2D",
        show_progress,
    )
    info = {
        "shape": list(shape),
        "steps": steps,
        "seed": seed,
        "public_volumes": len(volumes),
        "features_3d": WIDTHS[-1],
        "features_2d": WIDTHS[-1],
        "widths": list(WIDTHS),
        "stem_stride": list(stride),
        "final_loss": {
            "3d": volume_losses[-1] if volume_losses else None,
            "2d": slice_losses[-1] if slice_losses else None,
        },
    }
    nets = FeatureNets(volume_net[0], slice_net[0], info)
    state = {
        "info": info,
        "volume": nets.volume_trunk.state_dict(),
        "slice": nets.slice_trunk.state_dict(),
    }
    return nets, state


def ensure_feature_net(
    checkpoint: str | Path,
    public_dir: str | Path,
    config: Config,
    show_progress: bool = True,
    loaded: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict | None:
    """Train and save checkpoint/feature_net.pt from the public folder unless it exists.

    `loaded` = (volumes, scaled attributes) already read from `public_dir` saves reading
    it again. Returns the nets' facts (for metadata.json), or None when
    training.feature-steps is 0. Raises FedsynthError for an unusable public folder.
    """
    path = feature_net_path(checkpoint)
    if config.training.feature_steps == 0:
        return None
    if path.is_file():
        return load_torch(path)["info"]
    start = time.perf_counter()
    if loaded is None:
        dataset, _ = open_site(public_dir, config.data, show_progress=show_progress)
        items = [dataset[i] for i in progress(range(len(dataset)), "load public", show_progress)]
        loaded = torch.stack([v for v, _ in items]), torch.stack([a for _, a in items])
    volumes, attributes = (t.detach().cpu().float() for t in loaded)
    _, state = train_feature_nets(
        volumes, attributes, config.training.feature_steps, config.seed, show_progress
    )
    state["info"]["seconds"] = round(time.perf_counter() - start, 1)
    save_torch(path, state)
    return state["info"]


def load_feature_nets(checkpoint: str | Path) -> FeatureNets:
    """The feature networks of a checkpoint folder; a one-line FedsynthError when absent."""
    path = feature_net_path(checkpoint)
    if not path.is_file():
        raise FedsynthError(
            f"checkpoint {path.parent} has no {FEATURE_NET}; `fedsynth pretrain` writes one "
            "(training.feature-steps > 0), and a study's cached checkpoint gets one on its next run"
        )
    state = load_torch(path)
    info = state["info"]
    stride, widths = tuple(info["stem_stride"]), tuple(info["widths"])
    volume_trunk, slice_trunk = build_trunk(3, stride, widths), build_trunk(2, stride[:2], widths)
    volume_trunk.load_state_dict(state["volume"])
    slice_trunk.load_state_dict(state["slice"])
    return FeatureNets(volume_trunk.eval(), slice_trunk.eval(), info)
