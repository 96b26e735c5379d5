"""Label conventions: each dataset numbers the heart's structures its own way.

fedsynth's manifests use simulations/phantoms.py's LABELS: 1 RV blood pool, 2 LV
myocardium, 3 LV blood pool (ACDC's numbering). M&Ms and UK Biobank segmentations number
1 LV blood pool, 2 LV myocardium, 3 RV blood pool. A label map is converted voxel for
voxel; anything but whole numbers 0-3 means the file is not the segmentation it claims.
"""

from __future__ import annotations

import numpy as np

from fedsynth.common.data import VolumeError

RV_BLOOD, LV_MYOCARDIUM, LV_BLOOD = 1, 2, 3  # fedsynth's (phantoms.LABELS)


def convention(lv: int, myocardium: int, rv: int) -> dict[int, int]:
    """A dataset's label values of LV blood pool, myocardium, RV blood pool -> fedsynth's."""
    return {lv: LV_BLOOD, myocardium: LV_MYOCARDIUM, rv: RV_BLOOD}


ACDC = convention(lv=3, myocardium=2, rv=1)
MNMS = UKBB = convention(lv=1, myocardium=2, rv=3)


def to_fedsynth(data: np.ndarray, values: dict[int, int]) -> np.ndarray:
    """A label map in a dataset's convention as fedsynth's (uint8, same shape).

    Raises VolumeError for values that are not whole numbers or not in the convention."""
    rounded = np.rint(data)
    if not np.array_equal(rounded, data):
        raise VolumeError("label map holds values that are not whole numbers")
    found = set(np.unique(rounded).astype(int).tolist()) - {0}
    unknown = sorted(found - set(values))
    if unknown:
        expected = ", ".join(str(v) for v in sorted(values))
        raise VolumeError(f"label map holds values {unknown} besides 0 and {expected}")
    lut = np.zeros(max(values) + 1, np.uint8)
    for source, target in values.items():
        lut[source] = target
    return lut[rounded.astype(np.intp)]
