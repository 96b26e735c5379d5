"""Clinical attributes measured on label maps in fedsynth's convention (labels.py).

Volumes are voxel counts times the voxel volume of the affine in use (Volume.voxel_ml, mL:
the geometry site-check places the volume in, not pixdim); LV mass is the myocardial
volume times 1.05 g/mL (phantoms.MYOCARDIAL_DENSITY, the usual CMR value).
Wall thickness is measured in the short-axis frame (orientation.to_short_axis), slice by
slice in mm: for each myocardial pixel on the epicardial border, its in-plane distance to
the nearest LV blood-pool pixel centre (scipy's exact Euclidean distance transform in
physical units; across a ring of whole pixels this is the ring's thickness). A slice's
thickness is the median over its border, the heart's the median over the slices where
myocardium surrounds the cavity (basal slices open to the outflow tract and apical caps
without cavity do not count). On the phantoms, whose wall is the LV shell's thickness at
the base, this agrees within 1 mm (tests/test_importers.py).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from fedsynth.client.importers.labels import LV_BLOOD, LV_MYOCARDIUM, RV_BLOOD
from fedsynth.client.importers.volumes import Volume
from fedsynth.common.data import VolumeError
from fedsynth.common.orientation import OrientationError, to_short_axis

MYOCARDIAL_DENSITY = 1.05  # g/mL


def cavities(label: Volume) -> dict[str, float]:
    """LV and RV blood pool volumes (mL) and LV mass (g) of one phase's label map."""
    counts = np.bincount(label.data.astype(np.intp).ravel(), minlength=4)
    return {
        "lv": float(counts[LV_BLOOD]) * label.voxel_ml,
        "rv": float(counts[RV_BLOOD]) * label.voxel_ml,
        "mass": float(counts[LV_MYOCARDIUM]) * label.voxel_ml * MYOCARDIAL_DENSITY,
    }


def wall_thickness(label: Volume) -> float:
    """LV wall thickness (mm), as in the module docstring. Raises VolumeError when no
    slice has a myocardial ring around the cavity or the affine gives no short axis."""
    try:
        data, affine = to_short_axis(label.data, label.affine)
    except OrientationError as exc:
        raise VolumeError(str(exc)) from None
    pixel = tuple(float(s) for s in np.linalg.norm(affine[:3, :2], axis=0))
    per_slice = []
    for k in range(data.shape[2]):
        cavity, myocardium = data[..., k] == LV_BLOOD, data[..., k] == LV_MYOCARDIUM
        outside = ~(cavity | myocardium)
        if not cavity.any() or (ndimage.binary_dilation(cavity) & outside).any():
            continue  # no cavity, or one open to the rest of the slice
        border = myocardium & ndimage.binary_dilation(outside)
        if border.any():
            distance = ndimage.distance_transform_edt(~cavity, sampling=pixel)
            per_slice.append(float(np.median(distance[border])))
    if not per_slice:
        raise VolumeError("no slice where the LV myocardium surrounds the LV blood pool")
    return float(np.median(per_slice))


def from_labels(ed: Volume, es: Volume) -> dict[str, float]:
    """lvedv, lvesv, rvedv, rvesv (mL), lvef, rvef (%), lv_mass (g, at ED), wall_ed and
    wall_es (mm) of a subject's ED and ES label maps. Raises VolumeError for a phase
    without LV blood pool or an empty RV at ED."""
    at_ed, at_es = cavities(ed), cavities(es)
    for name, phase in (("ED", at_ed), ("ES", at_es)):
        if phase["lv"] <= 0:
            raise VolumeError(f"the {name} label map has no LV blood pool")
    if at_ed["rv"] <= 0:
        raise VolumeError("the ED label map has no RV blood pool")
    return {
        "lvedv": at_ed["lv"],
        "lvesv": at_es["lv"],
        "lvef": 100 * (at_ed["lv"] - at_es["lv"]) / at_ed["lv"],
        "rvedv": at_ed["rv"],
        "rvesv": at_es["rv"],
        "rvef": 100 * (at_ed["rv"] - at_es["rv"]) / at_ed["rv"],
        "lv_mass": at_ed["mass"],
        "wall_ed": wall_thickness(ed),
        "wall_es": wall_thickness(es),
    }


def bmi(height_cm: float, weight_kg: float) -> float:
    """Body mass index (kg/m2) from height in cm and weight in kg."""
    return weight_kg / (height_cm / 100) ** 2


MEASURED = ("lvedv", "lvesv", "lvef", "rvedv", "rvesv", "rvef", "lv_mass", "wall_ed", "wall_es")
