"""Is the file a manifest's `label` column names a label map in fedsynth's numbering?

fedsynth numbers 1 RV blood pool, 2 LV myocardium, 3 LV blood pool (ACDC's numbering, and
the phantoms'; other values are allowed: the phantoms use 4 tissue, 5 lungs). The anatomy
meter (anatomy.py) learns the LV from label 3 and the RV from label 1, so a map numbered
otherwise trains it on the wrong ventricle without a word. Refused here, per row:

- an image (non-integer values, or more than MAX_LABELS distinct values);
- a binary mask (label 1 without 2 or 3: what most contouring tools export for the LV);
- M&Ms / UK Biobank numbering (1 LV blood pool, 3 RV), told by the anatomy rather than the
  values: the LV blood pool is the label the myocardium (2) encloses on a short-axis
  slice, the RV lies beside it.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_fill_holes

from fedsynth.common.errors import FedsynthError
from fedsynth.common.volume_content import MAX_LABEL_VALUES as MAX_LABELS

# a label stored as float through a header's scaling may be off by rounding (2.0000002)
INTEGER_TOLERANCE = 1e-3

RV_BLOOD, LV_MYOCARDIUM, LV_BLOOD = 1, 2, 3
RENUMBER = (
    "renumber it (1 RV blood pool, 2 LV myocardium, 3 LV blood pool), or import the dataset "
    "with `fedsynth import`, which converts"
)


class LabelMapError(FedsynthError):
    """A label map that is not one in fedsynth's numbering; the message is the reason."""


def check_label_map(data: np.ndarray) -> None:
    """Refuse (LabelMapError) `data` (rows, columns, slices: the short-axis frame, as read)
    unless it is a label map in fedsynth's numbering (module docstring)."""
    if float(np.abs(data - np.rint(data)).max()) > INTEGER_TOLERANCE:
        raise LabelMapError("holds non-integer values: an image, not a label map")
    data = np.rint(data)
    values = np.unique(data)
    if len(values) > MAX_LABELS:
        raise LabelMapError(
            f"holds {len(values)} distinct values: an image, not a label map "
            f"(at most {MAX_LABELS} labels)"
        )
    present = {int(v) for v in values}
    if RV_BLOOD in present and not present & {LV_MYOCARDIUM, LV_BLOOD}:
        raise LabelMapError(
            "holds label 1 but no LV myocardium (2) or LV blood pool (3): a binary mask, "
            f"not fedsynth's numbering; {RENUMBER}"
        )
    enclosed = _enclosed_by_myocardium(data)
    if np.count_nonzero(data[enclosed] == RV_BLOOD) > np.count_nonzero(data[enclosed] == LV_BLOOD):
        raise LabelMapError(
            "label 1, not 3, is what the myocardium (2) encloses: numbered the M&Ms / "
            f"UK Biobank way (1 LV blood pool, 3 RV)? {RENUMBER}"
        )


def _enclosed_by_myocardium(data: np.ndarray) -> np.ndarray:
    """Voxels inside a closed ring of myocardium on their slice (bool, data's shape)."""
    myocardium = data == LV_MYOCARDIUM
    enclosed = np.zeros(data.shape, bool)
    for k in np.flatnonzero(myocardium.any(axis=(0, 1))):
        enclosed[..., k] = binary_fill_holes(myocardium[..., k]) & ~myocardium[..., k]
    return enclosed
