"""Physical geometry: a short-axis volume placed on the model's grid by resampling in mm.

A heart must have the same size and shape in the model's grid whatever pixel size, matrix
and slice thickness it was stored at. So a volume already in the short-axis frame
(orientation.to_short_axis: rows, columns, slices base to apex; permuted and flipped,
not interpolated) is resampled onto the model grid (`model_grid`): the same world
directions as the volume's voxel axes, the config's `data.spacing` (mm), `data.shape`
voxels, centred on a world point (the image centre, or the heart's centroid where a
label map says where it is). What lies outside the stack is zero.

Memory does not grow with the source matrix: the source is first cropped to the target
field of view plus the margin the smoothing and the interpolation read, then smoothed
(`AntiAlias`, per axis, only where the grid is coarser) and resampled with MONAI's
`SpatialResample` (bilinear for images, nearest for label maps, on the same grid).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import SpatialResample, Transform
from scipy.ndimage import gaussian_filter1d

# RV blood, LV myocardium, LV blood (simulations/phantoms.LABELS, ACDC); M&Ms and UK Biobank
# number the ventricles the other way round: the heart is labels 1-3 in either convention
HEART_LABELS = (1, 2, 3)
TRUNCATE = 4.0  # Gaussian kernel half-width in sigmas (scipy's default)
# Bump when what a volume looks like on the grid changes: part of the cache key of the
# simulation's public checkpoint (simulations/study_data.py), whose pretraining read them.
# 2: resampled in mm onto data.spacing, centred on the heart (1: whole field of view resized)
GRID_VERSION = 2


def spacing_of(affine: np.ndarray) -> np.ndarray:
    """Voxel spacing (mm) along each voxel axis of a 4x4 affine: its column norms, (3,)."""
    return np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)


def voxel_to_world(affine: np.ndarray, index: np.ndarray) -> np.ndarray:
    """World point (mm, (3,)) of a (fractional) voxel index (3,)."""
    return np.asarray(affine, dtype=float)[:3, :3] @ index + np.asarray(affine, dtype=float)[:3, 3]


def image_centre(affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """World point (mm) of the centre of a volume of `shape` (the middle of its voxels)."""
    return voxel_to_world(affine, (np.asarray(shape[:3], dtype=float) - 1) / 2)


def heart_centre(labels: np.ndarray, affine: np.ndarray) -> np.ndarray | None:
    """World point (mm) of the centroid of the heart labels (HEART_LABELS) of a label map
    (any 3D shape, integer-valued) with its affine; None where no voxel is heart."""
    heart = np.argwhere(np.isin(labels, HEART_LABELS))
    if not len(heart):
        return None
    return voxel_to_world(affine, heart.mean(axis=0))


def model_grid(
    affine: np.ndarray, spacing: Sequence[float], shape: Sequence[int], centre: np.ndarray
) -> np.ndarray:
    """The 4x4 affine of the model grid: the voxel axes' world directions of `affine` (unit
    columns), `spacing` mm per voxel, `shape` voxels, its middle at the world point `centre`."""
    directions = np.asarray(affine, dtype=float)[:3, :3] / spacing_of(affine)
    grid = np.eye(4)
    grid[:3, :3] = directions * np.asarray(spacing, dtype=float)
    grid[:3, 3] = np.asarray(centre, dtype=float) - grid[:3, :3] @ (
        (np.asarray(shape, dtype=float) - 1) / 2
    )
    return grid


def source_box(
    affine: np.ndarray, grid: np.ndarray, shape: Sequence[int]
) -> list[tuple[float, float]]:
    """Per source voxel axis, the (first, last) fractional source index the grid's voxel
    centres fall on: the target field of view in source voxels (may reach beyond the
    source, or miss it)."""
    to_source = np.linalg.inv(np.asarray(affine, dtype=float)) @ grid
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(3, -1)
    index = to_source[:3, :3] @ corners + to_source[:3, 3:4]
    return [(float(lo), float(hi)) for lo, hi in zip(index.min(1), index.max(1), strict=True)]


def smoothing_sigmas(source_spacing: np.ndarray, spacing: np.ndarray) -> list[float]:
    """Gaussian sigma (source voxels) per axis before resampling to a coarser spacing:
    skimage's (and MONAI Resize(anti_aliasing=True)'s) (factor - 1) / 2 with factor the
    target over the source spacing; 0 where the grid is as fine or finer."""
    return [max(0.0, (t / s - 1) / 2) for s, t in zip(source_spacing, spacing, strict=True)]


class AntiAlias(Transform):
    """Gaussian smoothing of a channel-first (1, X, Y, Z) volume, one axis at a time with
    the given sigmas (source voxels; 0 leaves an axis alone), before resampling to a
    coarser grid. scipy filters one axis at a time in memory of the volume's size (MONAI's
    convolution unfolds the volume by the kernel width)."""

    def __init__(self, sigmas: Sequence[float]) -> None:
        self.sigmas = tuple(sigmas)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        data = np.asarray(image.detach().cpu().numpy()[0], dtype=np.float32)
        for axis, sigma in enumerate(self.sigmas):
            if sigma > 0:
                data = gaussian_filter1d(data, sigma, axis=axis, mode="nearest", truncate=TRUNCATE)
        return torch.from_numpy(data)[None]


@dataclass(frozen=True)
class Placed:
    """A volume on the model grid: `data` (shape of the grid), `inside` (bool, same shape:
    grid voxels whose centre lies within the source stack; the rest is padding, 0)."""

    data: np.ndarray
    inside: np.ndarray


def resample(
    data: np.ndarray,
    affine: np.ndarray,
    grid: np.ndarray,
    shape: Sequence[int],
    *,
    labels: bool = False,
) -> Placed:
    """`data` (X, Y, Z) with its 4x4 affine, resampled onto the grid (`model_grid`) of `shape`.

    Images are smoothed where the grid is coarser (`smoothing_sigmas`) and interpolated
    bilinearly; label maps (`labels`) are sampled nearest, never blended or smoothed. The
    source is cropped to the grid's field of view plus the margin both read, first, so
    memory is bounded by that field of view, not by the source matrix. Outside the source
    (beyond half a voxel past its outer voxel centres) the result is 0. The grid's axes
    must be parallel to the source's (`model_grid`).
    """
    shape = tuple(int(n) for n in shape)
    source_spacing = spacing_of(affine)
    sigmas = [0.0] * 3 if labels else smoothing_sigmas(source_spacing, spacing_of(grid))
    box = source_box(affine, grid, shape)
    starts, stops = [], []
    for (lo, hi), n, sigma in zip(box, data.shape, sigmas, strict=True):
        margin = math.ceil(TRUNCATE * sigma) + 1
        starts.append(min(max(math.floor(lo) - margin, 0), n))
        stops.append(max(min(math.ceil(hi) + margin + 1, n), 0))
    inside = _inside(box, data.shape, shape)
    if any(stop - start < 1 for start, stop in zip(starts, stops, strict=True)) or not inside.any():
        return Placed(np.zeros(shape, np.float32), inside)
    crop = np.ascontiguousarray(
        data[tuple(slice(a, b) for a, b in zip(starts, stops, strict=True))]
    )
    crop_affine = np.asarray(affine, dtype=float).copy()
    crop_affine[:3, 3] = voxel_to_world(affine, np.asarray(starts, dtype=float))
    tensor = torch.from_numpy(crop.astype(np.float32))[None]
    if not labels:
        tensor = AntiAlias(sigmas)(tensor)
    out = SpatialResample(
        mode="nearest" if labels else "bilinear", padding_mode="border", align_corners=True
    )(
        MetaTensor(tensor, affine=torch.as_tensor(crop_affine)),
        dst_affine=torch.as_tensor(grid),
        spatial_size=shape,
    )
    result = np.asarray(out.detach().cpu().numpy()[0], dtype=np.float32)
    result[~inside] = 0
    return Placed(result, inside)


def _inside(
    box: Sequence[tuple[float, float]], source_shape: Sequence[int], shape: Sequence[int]
) -> np.ndarray:
    """Grid voxels whose centre lies within the source's voxels (half a voxel past the
    outer centres): axis-aligned grids, so a product of per-axis ranges."""
    masks = []
    for (lo, hi), n, m in zip(box, source_shape, shape, strict=True):
        index = np.linspace(lo, hi, m) if m > 1 else np.array([lo])
        masks.append((index >= -0.5) & (index <= n - 0.5))
    return masks[0][:, None, None] & masks[1][None, :, None] & masks[2][None, None, :]
