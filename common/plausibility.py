"""Is a stack's geometry that of a cardiac short-axis scan? Checks per volume, before the
resampling onto the model grid (geometry.py) trusts its affine.

Physical resampling is only as right as the affine: a header without geometry (unit
spacing, no qform or sform) or with a 1 mm slice spacing on a stack of 8 mm slices would
shrink the heart to a sliver, and a stack that does not reach the apex trains the model on
half hearts. Each check looks at one volume (and its label map, where the row has one),
in the short-axis frame (orientation.to_short_axis: rows, columns, slices base to apex),
and either refuses it (`GeometryError`, the message is the reason) or returns warnings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedsynth.common.errors import FedsynthError
from fedsynth.common.geometry import HEART_LABELS, spacing_of

# base to apex the ventricles span 70-100 mm: a stack covering less than this is misread
MIN_STACK_MM = 40.0
# ... and a short-axis stack planned over them spans less than this: a longer "stack" is
# likely the frames of a single-slice cine saved as its slices
MAX_STACK_MM = 180.0
# no chest is wider than this (a scanner's bore is 60-70 cm): an in-plane field of view
# above it, or a stack longer than MAX_EXTENT_MM along the slices, has a misread spacing (a
# converter's pixdim in 0.1 mm, micrometres read as millimetres)
MAX_IN_PLANE_MM = 600.0
MAX_EXTENT_MM = 400.0
# voxel axes meeting this far from a right angle: a sheared stack, not float rounding
MAX_SHEAR_DEG = 1.0
# adjacent slices of a stack correlating above this are near copies of each other
NEAR_COPY = 0.95
# an LV with its wall is 50-70 mm across, the heart more: an in-plane field of view below this
MIN_IN_PLANE_MM = 60.0
# without a label map, a stack covering less than this fraction of the configured slice
# field of view (data.shape x data.spacing along the slices) may miss part of the heart
MIN_SLICE_COVER = 0.6
# the heart on the last (apical) slice at this fraction of its largest cross-section or more:
# the ventricles taper to the apex, so the stack stopped before it
APEX_FRACTION = 0.5
AXES = ("rows", "columns", "slices")


class GeometryError(FedsynthError):
    """A volume whose geometry cannot be a cardiac stack; the message is the reason."""


def check_extent(affine: np.ndarray, shape: Sequence[int]) -> None:
    """Refuse a stack whose physical size cannot hold a heart: one covering less than
    MIN_STACK_MM along the slices (slices x spacing), or less than MIN_IN_PLANE_MM in-plane;
    or one larger than a chest: over MAX_EXTENT_MM along the slices or MAX_IN_PLANE_MM
    in-plane (a spacing ten times too large would place the heart at a tenth of its size).

    `affine` (4x4, mm) and `shape` (rows, columns, slices) of the short-axis array."""
    spacing = spacing_of(affine)
    extent = np.asarray(shape[:3], dtype=float) * spacing
    if extent[2] < MIN_STACK_MM:
        raise GeometryError(
            f"the stack covers only {extent[2]:g} mm along the slices ({shape[2]} slices x "
            f"{spacing[2]:g} mm), less than ventricles span ({MIN_STACK_MM:g} mm): is the "
            "slice spacing in the header right?"
        )
    if min(extent[:2]) < MIN_IN_PLANE_MM:
        raise GeometryError(
            f"the in-plane field of view {extent[0]:g} x {extent[1]:g} mm is smaller than a "
            f"heart ({MIN_IN_PLANE_MM:g} mm): is the pixel spacing in the header right?"
        )
    if extent[2] > MAX_EXTENT_MM or max(extent[:2]) > MAX_IN_PLANE_MM:
        raise GeometryError(
            f"the stack measures {extent[0]:g} x {extent[1]:g} mm in-plane ({shape[0]} x "
            f"{shape[1]} pixels of {spacing[0]:g} x {spacing[1]:g} mm) and {extent[2]:g} mm "
            f"along the slices ({shape[2]} x {spacing[2]:g} mm), larger than a chest (at most "
            f"{MAX_IN_PLANE_MM:g} mm in-plane, {MAX_EXTENT_MM:g} mm along the slices): is the "
            "spacing in the header right?"
        )


def check_axes(affine: np.ndarray) -> None:
    """Refuse a sheared stack: voxel axes (the columns of the 4x4 `affine`, mm) that meet
    more than MAX_SHEAR_DEG from a right angle, as slices stepping obliquely to their planes
    (per-slice series whose field of view moved between slices, a gantry tilt). Refused,
    not resampled: the model grid takes the stack's voxel directions (geometry.model_grid,
    whose resampling needs its axes parallel to the source's), so it would be sheared alike
    and the heart distorted; and a stack whose slices do not line up is no one volume."""
    directions = np.asarray(affine, dtype=float)[:3, :3] / spacing_of(affine)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        cosine = float(np.clip(directions[:, a] @ directions[:, b], -1.0, 1.0))
        angle = math.degrees(math.acos(cosine))
        if abs(angle - 90.0) > MAX_SHEAR_DEG:
            raise GeometryError(
                f"the {AXES[a]} and {AXES[b]} of the stack meet at {angle:.1f} degrees, not 90 "
                f"(sheared by {abs(angle - 90.0):.1f}; at most {MAX_SHEAR_DEG:g} is rounding): "
                "the slices do not step along their planes' normal; resample the stack onto an "
                "orthogonal grid, or check the header's affine"
            )


def check_length(data: np.ndarray, affine: np.ndarray) -> list[str]:
    """Warn about the cardiac phases of one slice location saved as a 3D volume (a
    single-slice cine squeezed to 3D), read as a stack of one slice per phase: longer along
    the slices than a short-axis stack of the heart spans (MAX_STACK_MM), with every slice
    a near copy of the next (correlation above NEAR_COPY), where a stack's slices change
    with the anatomy (the ventricles appear and taper). `data` (rows, columns, slices)
    with its 4x4 affine (mm)."""
    spacing = float(spacing_of(affine)[2])
    length = data.shape[2] * spacing
    if length <= MAX_STACK_MM:
        return []
    flat = data.reshape(-1, data.shape[2])
    for k in range(data.shape[2] - 1):
        one, two = (flat[:, j].astype(np.float64) for j in (k, k + 1))
        one -= one.mean()
        two -= two.mean()
        norms = float(np.sqrt((one @ one) * (two @ two)))
        if norms == 0 or float(one @ two) / norms < NEAR_COPY:
            return []
    return [
        f"the stack covers {length:g} mm along the slices ({data.shape[2]} slices x "
        f"{spacing:g} mm), more than a short-axis stack spans ({MAX_STACK_MM:g} mm), and each "
        "slice is a near copy of the next: the frames of one slice location (a single-slice "
        "cine saved as 3D)? a stack must hold one slice location per slice"
    ]


def check_slices(data: np.ndarray) -> list[str]:
    """Refuse a stack with a constant (zero-filled) slice between slices with content: a
    missing slice, which would be read as anatomy. Blank slices at either end are warned
    about. `data` is (rows, columns, slices); returns the warnings."""
    flat = data.reshape(-1, data.shape[2])
    blank = flat.max(axis=0) == flat.min(axis=0)
    content = np.flatnonzero(~blank)
    if not len(content):
        return []  # a constant volume is refused by data.read_nifti
    first, last = int(content[0]), int(content[-1])
    missing = [k for k in range(first, last + 1) if blank[k]]
    if missing:
        shown = ", ".join(str(k + 1) for k in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise GeometryError(
            f"slice(s) {shown} of {data.shape[2]} (base to apex) are constant between slices "
            "with content: missing slices filled in?"
        )
    ends = [
        f"the first {first} slice(s)" if first else "",
        f"the last {data.shape[2] - 1 - last} slice(s)" if last < data.shape[2] - 1 else "",
    ]
    said = " and ".join(e for e in ends if e)
    return [f"{said} of {data.shape[2]} (base to apex) are blank"] if said else []


def check_cover(affine: np.ndarray, shape: Sequence[int], slice_fov: float) -> list[str]:
    """Without a label map: warn where the stack covers much less along the slices than
    the configured slice field of view `slice_fov` (mm), so it may miss part of the heart."""
    covered = float(shape[2] * spacing_of(affine)[2])
    if covered < MIN_SLICE_COVER * slice_fov:
        return [
            f"the stack covers {covered:g} mm along the slices, much less than the "
            f"{slice_fov:g} mm field of view: does it reach from the base to the apex?"
        ]
    return []


def check_heart(
    labels: np.ndarray,
    label_affine: np.ndarray,
    affine: np.ndarray,
    shape: Sequence[int],
    grid: np.ndarray,
    grid_shape: Sequence[int],
) -> list[str]:
    """Where a label map says where the heart is (HEART_LABELS): warn when the stack stops
    before the apex or the heart reaches its in-plane border (cut off by the scan), and
    when the heart reaches beyond the model grid (`grid`, a 4x4 affine of `grid_shape`
    voxels: geometry.model_grid), which crops it. `labels` (any 3D grid over the stack's
    place, axes parallel to its: the short-axis frame) with its `label_affine`; the stack
    has `affine` and `shape` (rows, columns, slices).

    The apex is missing where the stack's last (apical) slice still holds at least
    APEX_FRACTION of the heart's largest cross-section: towards the apex the ventricles
    taper to a point. Heart labels on the first slice are no warning: short-axis stacks are
    planned from the base, and a basal slice through the valve plane is where most of them
    begin."""
    is_heart = np.isin(labels, HEART_LABELS)
    heart = np.argwhere(is_heart)
    if not len(heart):
        return ["the label map has no heart labels (1-3: ventricles and LV myocardium)"]
    warnings = []
    edges = []
    to_stack = np.linalg.inv(np.asarray(affine, dtype=float)) @ np.asarray(label_affine, float)
    on_stack = heart @ to_stack[:3, :3].T + to_stack[:3, 3]
    last = np.asarray(shape[:3], dtype=float) - 1
    areas = is_heart.sum(axis=(0, 1))
    apical = to_stack[2, 2] * (labels.shape[2] - 1) + to_stack[2, 3]  # its last slice's
    if apical > last[2] - 0.5 and areas[-1] >= APEX_FRACTION * areas.max():
        edges.append(
            f"the last (apical) slice with {100 * areas[-1] / areas.max():.0f}% of its largest "
            "cross-section: the stack stops before the apex"
        )
    low, high = on_stack.min(axis=0), on_stack.max(axis=0)
    if np.any(low[:2] < 0.5) or np.any(high[:2] > last[:2] - 0.5):
        edges.append("the in-plane border: the scan cuts it off")
    if edges:
        warnings.append(f"the heart labels reach {' and '.join(edges)}")
    to_grid = np.linalg.inv(grid) @ np.asarray(label_affine, dtype=float)
    index = heart @ to_grid[:3, :3].T + to_grid[:3, 3]
    limit = np.asarray(grid_shape[:3], dtype=float) - 0.5
    out = [AXES[a] for a in range(3) if index[:, a].min() < -0.5 or index[:, a].max() > limit[a]]
    if out:
        # the heart's physical length: between the outer label voxels' centres plus one
        # label voxel (its own size, projected on the grid's axis), not one grid voxel
        voxel = np.abs(to_grid[:3, :3]).sum(axis=1)
        extent = (index.max(axis=0) - index.min(axis=0) + voxel) * spacing_of(grid)
        sizes = ", ".join(f"{extent[AXES.index(a)]:.0f} mm along the {a}" for a in out)
        warnings.append(
            f"the heart ({sizes}) reaches beyond the model's field of view: it is cropped"
        )
    return warnings
