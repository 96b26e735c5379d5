"""Physical geometry: a short-axis volume placed on the model's grid by resampling in mm.

A heart must have the same size and shape in the model's grid whatever pixel size, matrix
and slice thickness it was stored at. So a volume already in the short-axis frame
(orientation.to_short_axis: rows, columns, slices base to apex; permuted and flipped,
not interpolated) is resampled onto the model grid (`model_grid`): the same world
directions as the volume's voxel axes, the config's `data.spacing` (mm), `data.shape`
voxels, centred on a world point (`grid_centre`). What lies outside the stack is zero.

Where the grid is centred (`grid_centre`): along the slices its first slice is centred on
the stack's first, so the ED and ES frames of one stack land on one grid (the base
descends in systole; a heart's own centre moves with it) and a stack the grid holds keeps
every slice; only a heart that reaches past that window moves it, the least that holds
the heart, rounded to a start whose first slice is again centred on a source slice where
that still holds it (else a label map ties half-way between two source slices). In-plane:
the middle of the heart's bounding box (`heart_box`) where a label map says where it is,
not its centroid (the RV crescent pulls that aside; along the slices the ventricles' flat
valve plane pulled it apically and wasted basal grid slices).

Memory does not grow with the source matrix: the source is first cropped to the target
field of view plus the margin the smoothing and the interpolation read, then smoothed
(`AntiAlias`, per axis, only where the grid is coarser) and resampled with MONAI's
`SpatialResample` (bilinear). A label map is resampled one label at a time the same way
(its one-hot channel), and each grid voxel takes the label of the largest share: the
partial-volume majority, as MONAI resamples labels without blending classes (nearest
sampling breaks the ties at half-voxel offsets by float rounding, taking source slices
twice or not at all).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
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
# 3: from the stack's base along the slices, on the heart's bounding box in-plane; label
# maps by partial-volume majority
# 4: the grid's first slice centred on the stack's first (3: on its basal edge)
# 5: a window the heart moves starts on a source slice (4: at the heart's edge)
GRID_VERSION = 5
# Shares closer than this are a tie (exactly half-way between two source voxels, up to the
# float32 rounding of a stored affine): split between the labels by a checkerboard of grid
# voxels, so that neither label gains the half-voxels (either rule alone adds or drops half
# a slice of a cavity at every end)
TIE = 1e-4


def spacing_of(affine: np.ndarray) -> np.ndarray:
    """Voxel spacing (mm) along each voxel axis of a 4x4 affine: its column norms, (3,)."""
    return np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)


def voxel_to_world(affine: np.ndarray, index: np.ndarray) -> np.ndarray:
    """World point (mm, (3,)) of a (fractional) voxel index (3,)."""
    return np.asarray(affine, dtype=float)[:3, :3] @ index + np.asarray(affine, dtype=float)[:3, 3]


def image_centre(affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """World point (mm) of the centre of a volume of `shape` (the middle of its voxels)."""
    return voxel_to_world(affine, (np.asarray(shape[:3], dtype=float) - 1) / 2)


def heart_box(
    labels: np.ndarray, label_affine: np.ndarray, affine: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """The heart's (HEART_LABELS) bounding box in a stack's voxel frame: (low, high), (3,)
    each, in mm along the voxel axes of `affine` from its voxel 0, each label voxel's full
    size included. `labels` (any 3D integer-valued array) with its own `label_affine`, which
    may be another grid over the same place. None where no voxel is heart."""
    heart = np.argwhere(np.isin(labels, HEART_LABELS))
    if not len(heart):
        return None
    edges = np.stack([heart.min(axis=0) - 0.5, heart.max(axis=0) + 0.5], axis=1)
    corners = np.array(np.meshgrid(*edges, indexing="ij")).reshape(3, -1)
    to_index = np.linalg.inv(np.asarray(affine, dtype=float)) @ np.asarray(label_affine, float)
    mm = (to_index[:3, :3] @ corners + to_index[:3, 3:4]) * spacing_of(affine)[:, None]
    return mm.min(axis=1), mm.max(axis=1)


def grid_centre(
    affine: np.ndarray,
    shape: Sequence[int],
    grid_spacing: Sequence[float],
    grid_shape: Sequence[int],
    heart: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """World point (mm) the model grid (`grid_spacing`, `grid_shape`) is centred on for a
    stack (`affine`, `shape`: rows, columns, slices base to apex) whose heart is `heart`
    (`heart_box`) or unknown (None).

    Along the slices the grid's first slice is centred on the stack's first (stacks are
    planned from the base; the padding of a short stack goes to the apical end), so every
    frame of one stack lands on one grid and hearts start at one depth; where the heart reaches
    past that window, it moves the least that holds the heart (a heart longer than the
    window: centred on it), rounded to the nearest start whose first slice is again centred
    on a source slice (`on_lattice`), so a label map does not tie half-way between two
    source slices on every grid slice (a checkerboard at the heart's ends). In-plane: the
    middle of the heart's bounding box, else of the image."""
    step = spacing_of(affine)
    centre = (np.asarray(shape[:3], dtype=float) - 1) / 2 * step  # mm from voxel 0
    fov = float(grid_shape[2] * grid_spacing[2])
    # the window's basal edge, mm from voxel 0: the grid's first slice is centred on the
    # stack's first, so grid slices fall on source slices where the spacings divide (8 mm
    # onto 16 mm) rather than half-way between two, where a label map would tie
    start = -float(grid_spacing[2]) / 2
    if heart is not None:
        low, high = heart
        centre[:2] = (low[:2] + high[:2]) / 2
        if high[2] - low[2] >= fov:  # cropped either way: centred to within half a slice
            moved = (low[2] + high[2] - fov) / 2
            start = on_lattice(moved, float(step[2]), grid_spacing[2], (-math.inf, math.inf))
        else:
            moved = float(np.clip(start, high[2] - fov, low[2]))
            start = on_lattice(moved, float(step[2]), grid_spacing[2], (high[2] - fov, low[2]))
    centre[2] = start + fov / 2
    return voxel_to_world(affine, centre / step)


def on_lattice(
    start: float, source_step: float, grid_step: float, allowed: tuple[float, float]
) -> float:
    """The window start (mm from source voxel 0, the grid's first slice's basal edge) within
    `allowed` (low, high) nearest to `start` at which the grid's first slice is centred on a
    source slice (`source_step` mm apart; the grid's `grid_step` mm): then every grid slice
    lies on a source slice where the spacings divide, and none half-way between two, where
    a label map's shares tie. `start` itself where no such start lies within `allowed`
    (holding the heart comes first)."""
    low, high = allowed
    centre = start + grid_step / 2  # the grid's first slice centre
    candidates = [
        k * source_step - grid_step / 2
        for k in (math.floor(centre / source_step), math.ceil(centre / source_step))
    ]
    inside = [c for c in candidates if low - 1e-6 <= c <= high + 1e-6]
    return min(inside, key=lambda c: abs(c - start)) if inside else start


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
    bilinearly. A label map (`labels`, integer-valued) is resampled so, one label's one-hot
    channel at a time, and each grid voxel takes the label with the largest share (ties,
    within TIE: split by a checkerboard of grid voxels); only labels that were there. The
    source is cropped to the grid's field of view plus the margin both read, first, so
    memory is bounded by that field of view (times two for a label map), not by the source
    matrix. Outside the source (beyond half a voxel past its outer voxel centres) the
    result is 0; a label map is read as background beyond its edges. The grid's axes must
    be parallel to the source's (`model_grid`).
    """
    shape = tuple(int(n) for n in shape)
    sigmas = smoothing_sigmas(spacing_of(affine), spacing_of(grid))
    box = source_box(affine, grid, shape)
    starts, stops, margins = [], [], []
    for (lo, hi), n, sigma in zip(box, data.shape, sigmas, strict=True):
        margins.append(math.ceil(TRUNCATE * sigma) + 1)
        starts.append(min(max(math.floor(lo) - margins[-1], 0), n))
        stops.append(max(min(math.ceil(hi) + margins[-1] + 1, n), 0))
    inside = _inside(box, data.shape, shape)
    if any(stop - start < 1 for start, stop in zip(starts, stops, strict=True)) or not inside.any():
        return Placed(np.zeros(shape, np.float32), inside)
    crop = data[tuple(slice(a, b) for a, b in zip(starts, stops, strict=True))]
    origin = np.asarray(starts, dtype=float)
    if labels:  # beyond a label map nothing is labelled: background (0), not its edge voxels
        pads = [
            (m if a == 0 else 0, m if b == n else 0)
            for a, b, n, m in zip(starts, stops, data.shape, margins, strict=True)
        ]
        crop = np.pad(crop, pads)
        origin -= [before for before, _ in pads]
    crop_affine = np.asarray(affine, dtype=float).copy()
    crop_affine[:3, 3] = voxel_to_world(affine, origin)

    def onto_grid(channel: np.ndarray) -> np.ndarray:
        tensor = AntiAlias(sigmas)(torch.from_numpy(channel.astype(np.float32))[None])
        out = SpatialResample(mode="bilinear", padding_mode="border", align_corners=True)(
            MetaTensor(tensor, affine=torch.as_tensor(crop_affine)),
            dst_affine=torch.as_tensor(grid),
            spatial_size=shape,
        )
        return np.asarray(out.detach().cpu().numpy()[0], dtype=np.float32)

    result = _majority(crop, onto_grid, shape) if labels else onto_grid(crop)
    result[~inside] = 0
    return Placed(result, inside)


def _majority(
    crop: np.ndarray, onto_grid: Callable[[np.ndarray], np.ndarray], shape: tuple[int, ...]
) -> np.ndarray:
    """Each grid voxel's label of the largest share: `onto_grid` (resampling) of each
    label's one-hot channel of `crop`, one at a time (the labels present are few). A tie
    goes to the higher label on one colour of a checkerboard, the lower on the other."""
    i, j, k = (np.arange(n) for n in shape)
    checker = ((i[:, None, None] + j[None, :, None] + k[None, None, :]) % 2 * 2 - 1).astype(
        np.float32
    )  # +1 / -1
    best = np.full(shape, -np.inf, np.float32)
    result = np.zeros(shape, np.float32)
    for rank, value in enumerate(np.unique(crop)):
        share = onto_grid(crop == value) + np.float32(TIE) * rank * checker
        wins = share > best
        best[wins] = share[wins]
        result[wins] = value
    return result


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
