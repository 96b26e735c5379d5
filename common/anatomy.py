"""Anatomy measured on volumes: a small MONAI segmenter trained on PUBLIC labelled phantoms.

Controllability asks whether a volume generated for "LVEDV 180 mL" has a 180 mL cavity.
The segmenter finds the LV and RV blood pools at the model's resolution; a linear
calibration, fitted on the public set, maps voxel counts to the mL the manifests state.
Volumes and label maps are resampled in mm onto the model grid (data.to_model,
data.place_labels: data.spacing, one grid for a volume and its label map, the label map
by partial-volume majority), so a voxel holds the grid's voxel volume whatever the scan's
spacing, and the fitted slope comes out near it; the calibration absorbs what the
segmenter and the grid's coarse slices add.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from fedsynth.common.config import DataConfig
from fedsynth.common.data import (
    SiteManifest,
    image_stack,
    load_volume,
    place_labels,
    read_labels,
)
from fedsynth.common.models import padded_call
from fedsynth.common.progress import progress

CLASSES = 6  # background, RV blood, LV myocardium, LV blood, other tissue, lungs
RV_BLOOD, LV_BLOOD = 1, 3


def load_labelled(
    manifest: SiteManifest,
    data_cfg: DataConfig,
    show_progress: bool = True,
    volumes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, np.ndarray]] | None:
    """(volumes, labels, requested) of the usable rows whose manifest names a label map.

    `requested` maps "lv"/"rv" to the volume the row states for its phase (EDV or ESV).
    `volumes`, when the caller has already loaded the records' volumes (in their order,
    as check_site reads them: placed by their label map), saves reading the
    images again. Each label map lands on its image's grid voxel for voxel.
    """
    images, labels, lv, rv = [], [], [], []
    records = progress(list(enumerate(manifest.records)), "labelled public", show_progress)
    for i, record in records:
        if record.label is None:
            continue
        label = read_labels(record.label, data_cfg.max_voxels)
        if volumes is not None:
            images.append(volumes[i])
        else:
            images.append(load_volume(record.image, data_cfg, record.label))
        stack = image_stack(record.image, data_cfg.max_voxels)
        labels.append(place_labels(label, data_cfg, stack))
        a = record.attributes
        es = a.get("phase", 0) == 1
        lv.append(a["lvesv"] if es else a["lvedv"])
        rv.append(a["rvesv"] if es else a["rvedv"])
    if not images:
        return None
    return torch.stack(images), torch.stack(labels), {"lv": np.array(lv), "rv": np.array(rv)}


def build_segmenter() -> UNet:
    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=CLASSES,
        channels=(16, 32, 64),
        strides=(2, 2),
        num_res_units=1,
    )


def _segment(segmenter: UNet, volumes: torch.Tensor) -> torch.Tensor:
    """Class logits for volumes of any shape (the UNet needs multiples of its strides)."""
    return padded_call(segmenter, volumes, int(np.prod(segmenter.strides)))


@torch.no_grad()
def voxel_counts(segmenter: UNet, volumes: torch.Tensor, batch: int = 4) -> dict[str, np.ndarray]:
    """LV and RV blood-pool voxel counts per volume at the model's resolution."""
    segmenter.eval()
    lv, rv = [], []
    for start in range(0, len(volumes), batch):
        classes = _segment(segmenter, volumes[start : start + batch]).argmax(dim=1)
        lv.append((classes == LV_BLOOD).flatten(1).sum(1))
        rv.append((classes == RV_BLOOD).flatten(1).sum(1))
    return {"lv": torch.cat(lv).cpu().numpy(), "rv": torch.cat(rv).cpu().numpy()}


@dataclass
class VolumeMeter:
    """A trained segmenter plus the calibration from voxel counts to mL."""

    segmenter: UNet
    calibration: dict[str, tuple[float, float]]  # cavity -> (slope, intercept)

    def measure(self, volumes: torch.Tensor) -> dict[str, np.ndarray]:
        counts = voxel_counts(self.segmenter, volumes)
        return {k: self.calibration[k][0] * counts[k] + self.calibration[k][1] for k in counts}

    def state(self) -> dict:
        return {"segmenter": self.segmenter.state_dict(), "calibration": self.calibration}

    @classmethod
    def from_state(cls, state: dict) -> VolumeMeter:
        segmenter = build_segmenter()
        segmenter.load_state_dict(state["segmenter"])
        calibration = {k: (float(a), float(b)) for k, (a, b) in state["calibration"].items()}
        return cls(segmenter.eval(), calibration)


def train_volume_meter(
    volumes: torch.Tensor,
    labels: torch.Tensor,
    requested: dict[str, np.ndarray],
    steps: int,
    seed: int,
    show_progress: bool = True,
) -> VolumeMeter:
    """Fit the segmenter on public labelled volumes, then the count-to-mL calibration."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    segmenter = build_segmenter().to(volumes.device)
    optimizer = torch.optim.Adam(segmenter.parameters(), lr=2e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    segmenter.train()
    for _ in progress(range(steps), "segmenter", show_progress):
        index = torch.randint(0, len(volumes), (min(4, len(volumes)),), generator=generator)
        loss = loss_fn(_segment(segmenter, volumes[index]), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    counts = voxel_counts(segmenter, volumes)
    fits = {k: np.polyfit(counts[k], requested[k], 1) for k in counts}
    calibration = {k: (float(slope), float(offset)) for k, (slope, offset) in fits.items()}
    return VolumeMeter(segmenter.eval(), calibration)


def agreement(requested: np.ndarray, measured: np.ndarray) -> dict[str, float]:
    """Pearson correlation and mean absolute error between requested and measured mL."""
    r = float(np.corrcoef(requested, measured)[0, 1]) if len(requested) > 1 else float("nan")
    return {
        "pearson_r": r,
        "mae_ml": float(np.mean(np.abs(requested - measured))),
        "n": len(requested),
    }


def meter_path(checkpoint: Path) -> Path:
    """Where a checkpoint folder keeps its volume meter."""
    return Path(checkpoint) / "volume_meter.pt"
