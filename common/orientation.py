"""The one geometry convention of every volume the model sees: the short-axis frame.

A cardiac short-axis (SAX) stack can be planned at any angle, and scanners store its voxel
axes in any order and sign (RAS or LPS, slices first or last, apex-to-base or base-to-apex).
Reorienting to RAS, as general-purpose pipelines do, puts the slices on whichever array axis
lies closest to left-right, and then a resize squeezes an in-plane axis into the few slices.
Instead every volume (site scans, phantoms, generated cohorts) is brought into one frame,
decided from the affine alone, by permuting and flipping its voxel axes (no resampling):

- Slice axis: the voxel axis with the largest spacing (slice thickness plus gap, typically
  6-10 mm against 1-2 mm in-plane). Where the largest spacings are within 10 % of each other
  (isotropic volumes), the one of those axes with the fewest voxels; if that ties too, the
  last of them as stored (where scanners write slices). The slice axis becomes the LAST
  array axis.
- Slice order: base to apex by the anatomy. The apex lies left, anterior and inferior of
  the base, so slices are ordered by their position along `APEX` = (-1, 1, -1)/sqrt(3) in
  RAS+ world coordinates (x to the patient's Right, y Anterior, z Superior): slice 0 the
  basal end, the last slice the apical end. A stack whose normal is almost perpendicular
  to `APEX` (cosine below `MIN_APEX_COSINE`) has no base or apex end and is refused.
- In-plane: the slice normal w (towards the apex) fixes a right-handed frame (u, v, w):
  u is `SAX_POSTERIOR` (posterior, projected into the nominal short-axis plane, i.e.
  perpendicular to `APEX`) projected into the stack's slice plane, v = w x u. For an axial
  stack u is posterior-and-a-little-left and v the patient's left; for the nominal SAX
  plane u points to the inferior (diaphragmatic) wall and v to the lateral wall. Array
  rows (axis 0) run along the in-plane voxel axis closer to u, columns (axis 1) along the
  other, each flipped to point along +u / +v. Seen as an image (row 0 at the top) this is
  the usual SAX display: anterior wall up, right ventricle on the left, lateral wall on
  the right. Because only permutations and flips are used, the result matches (u, v) to
  within 45 degrees of in-plane rotation; at exactly 45 degrees the stored order is kept.

The outcome depends only on the world geometry, not on how the voxels were stored: the same
anatomy stored as RAS or LPS, either slice order, slices first or last, gives the same array.
"""

from __future__ import annotations

import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff

from fedsynth.common.errors import FedsynthError

APEX = np.array([-1.0, 1.0, -1.0]) / np.sqrt(3.0)  # RAS+: left, anterior, inferior
SAX_POSTERIOR = np.array([-1.0, -2.0, -1.0]) / np.sqrt(6.0)  # posterior, perpendicular to APEX
MIN_APEX_COSINE = 0.2  # |cos(slice normal, APEX)| below this: no base or apex end (78 degrees)
SPACING_TIE = 0.9  # spacings within 10 % of the largest count as equal


class OrientationError(FedsynthError):
    """A volume whose affine does not define a short-axis frame (the message is the reason)."""


def _directions(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit world direction (columns, 3x3) and spacing (mm) of each voxel axis."""
    columns = np.asarray(affine, dtype=float)[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise OrientationError("affine is singular: a voxel axis has no direction in space")
    if abs(np.linalg.det(columns / spacing)) < 1e-3:
        raise OrientationError("affine is singular: its voxel axes are not independent")
    return columns / spacing, spacing


def slice_axis(affine: np.ndarray, shape: tuple[int, ...]) -> int:
    """The stored voxel axis that runs across the slices (rule in the module docstring)."""
    _, spacing = _directions(affine)
    candidates = [a for a in range(3) if spacing[a] >= SPACING_TIE * spacing.max()]
    fewest = min(shape[a] for a in candidates)
    return [a for a in candidates if shape[a] == fewest][-1]


def short_axis_frame(normal: np.ndarray) -> np.ndarray:
    """Columns u, v, w (RAS+, unit): rows, columns and base-to-apex slice direction.

    `normal` is the slice normal in either sign; w is it turned towards the apex. Raises
    OrientationError for a normal almost perpendicular to `APEX`.
    """
    w = np.asarray(normal, dtype=float) / np.linalg.norm(normal)
    cosine = float(w @ APEX)
    if abs(cosine) < MIN_APEX_COSINE:
        raise OrientationError(
            "slice normal is almost perpendicular to the heart's long axis: "
            "cannot tell the base from the apex (not a short-axis stack?)"
        )
    w = w if cosine > 0 else -w
    u = SAX_POSTERIOR - (SAX_POSTERIOR @ w) * w
    u /= np.linalg.norm(u)
    return np.stack([u, np.cross(w, u), w], axis=1)


def short_axis_ornt(affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The nibabel orientation (3x2: target axis, +1/-1 flip) taking storage to the frame."""
    directions, _ = _directions(affine)
    k = slice_axis(affine, shape)
    u, v, w = short_axis_frame(directions[:, k]).T
    p, q = (a for a in range(3) if a != k)
    d = directions
    swap = abs(d[:, q] @ u) + abs(d[:, p] @ v) > abs(d[:, p] @ u) + abs(d[:, q] @ v) + 1e-9
    row, col = (q, p) if swap else (p, q)
    ornt = np.zeros((3, 2))
    for axis, target, reference in ((row, 0, u), (col, 1, v), (k, 2, w)):
        ornt[axis] = (target, -1.0 if d[:, axis] @ reference < 0 else 1.0)
    return ornt


def to_short_axis(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A 3D volume and its 4x4 affine, permuted/flipped into the short-axis frame.

    Returns (array of shape (rows, columns, slices), the affine of that array). The voxel
    values are not interpolated. Raises OrientationError when the affine defines no frame.
    """
    ornt = short_axis_ornt(affine, data.shape)
    out = np.ascontiguousarray(apply_orientation(data, ornt))
    return out, np.asarray(affine, dtype=float) @ inv_ornt_aff(ornt, data.shape)


def short_axis_geometry(
    affine: np.ndarray, shape: tuple[int, ...]
) -> tuple[np.ndarray, tuple[int, ...]]:
    """The affine and shape `to_short_axis` gives a volume of `shape` (3D; trailing axes of
    length 1 ignored), from its header alone (no voxels read). Raises OrientationError when
    the affine defines no frame."""
    shape = tuple(int(n) for n in shape[:3])
    ornt = short_axis_ornt(affine, shape)
    order = np.argsort(ornt[:, 0])  # the stored axis that becomes each frame axis
    framed = tuple(int(shape[a]) for a in order)
    return np.asarray(affine, dtype=float) @ inv_ornt_aff(ornt, shape), framed


def short_axis_affine(
    spacing: tuple[float, float, float],
    shape: tuple[int, int, int],
    normal: np.ndarray = APEX,
) -> np.ndarray:
    """The affine of an array already in the frame: voxel axes along (u, v, w) of `normal`.

    spacing: mm per voxel (rows, columns, slices); the volume is centred on the world
    origin. Writing an array with this affine makes `to_short_axis` return it unchanged.
    """
    affine = np.eye(4)
    affine[:3, :3] = short_axis_frame(normal) * np.asarray(spacing, dtype=float)
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return affine
