"""Label conventions: each dataset numbers the heart's structures its own way.

fedsynth's manifests use simulations/phantoms.py's LABELS: 1 RV blood pool, 2 LV
myocardium, 3 LV blood pool (ACDC's numbering). M&Ms and UK Biobank segmentations number
1 LV blood pool, 2 LV myocardium, 3 RV blood pool. A label map is converted voxel for
voxel; anything but whole numbers 0-3 means the file is not the segmentation it claims.
A numbering is checked against the anatomy first (`check_numbering`): the LV myocardium
encloses the LV blood pool in a short-axis slice, so a label map whose enclosed value is
not the numbering's LV blood pool is numbered otherwise, and the refusal says so.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from scipy import ndimage

from fedsynth.common.data import VolumeError
from fedsynth.common.orientation import OrientationError, to_short_axis

RV_BLOOD, LV_MYOCARDIUM, LV_BLOOD = 1, 2, 3  # fedsynth's (phantoms.LABELS)


def convention(lv: int, myocardium: int, rv: int) -> dict[int, int]:
    """A dataset's label values of LV blood pool, myocardium, RV blood pool -> fedsynth's."""
    return {lv: LV_BLOOD, myocardium: LV_MYOCARDIUM, rv: RV_BLOOD}


ACDC = convention(lv=3, myocardium=2, rv=1)
MNMS = UKBB = convention(lv=1, myocardium=2, rv=3)
MAX_VALUES = 8  # more distinct values than this: not a heart segmentation (to_fedsynth says)


def enclosures(data: np.ndarray, affine: np.ndarray) -> Counter[tuple[int, int]]:
    """(outer, inner) label values, counted over the short-axis slices where all of `inner`
    touches nothing but `outer` (4-connected, in-plane; the slice edge counts as background):
    a myocardium around its blood pool. `data` is a label map (X, Y, Z) in any numbering
    with its affine; empty when the affine gives no short-axis frame or the map holds more
    than MAX_VALUES values."""
    try:
        oriented, _ = to_short_axis(np.rint(data), affine)
    except OrientationError:
        return Counter()  # named where the geometry is used (measures.wall_thickness)
    values = [int(v) for v in np.unique(oriented) if v != 0]
    found: Counter[tuple[int, int]] = Counter()
    if len(values) > MAX_VALUES:
        return found
    for k in range(oriented.shape[2]):
        plane = np.pad(oriented[..., k], 1)
        for inner in values:
            region = plane == inner
            if not region.any():
                continue
            around = np.unique(plane[ndimage.binary_dilation(region) & ~region])
            if len(around) == 1 and around[0] != 0:
                found[int(around[0]), inner] += 1
    return found


def check_numbering(
    data: np.ndarray, affine: np.ndarray, values: dict[int, int], hint: str = ""
) -> None:
    """Refuse (VolumeError) a label map whose anatomy contradicts the numbering `values`
    (a dataset's value -> fedsynth's): no slice where its myocardium value encloses its LV
    blood pool value, while another value is enclosed by one. The message names the values
    found; `hint` (with {lv}, {myocardium}, {rv} placeholders: the numbering they suggest)
    says how to give it. Nothing is refused where no value encloses another (measures
    names what is missing)."""
    of = {target: source for source, target in values.items()}
    lv, myocardium, rv = of[LV_BLOOD], of[LV_MYOCARDIUM], of[RV_BLOOD]
    found = enclosures(data, affine)
    if not found or (myocardium, lv) in found:
        return
    (outer, inner), slices = found.most_common(1)[0]
    present = {int(v) for v in np.unique(np.rint(data))} - {0, outer, inner}
    rest = present if len(present) == 1 else set(values) - {outer, inner}
    message = (
        f"label value {inner} lies inside value {outer} in {slices} slice(s) (a blood pool "
        f"inside its myocardium), value {lv} never inside {myocardium}: numbered LV {inner}, "
        f"myocardium {outer}, not as read (LV {lv}, myocardium {myocardium}, RV {rv})?"
    )
    if hint:
        other = rest.pop() if len(rest) == 1 else "RV"
        message += "; " + hint.format(lv=inner, myocardium=outer, rv=other)
    raise VolumeError(message)


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
