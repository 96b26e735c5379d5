"""Is a decoded volume an MR magnitude image? Checks of content, not format.

A file can be a valid NIfTI volume and still not be what the image column promises: a
label map (few distinct values in constant regions, whatever their scale), a blank volume
with a stray voxel, values beyond what 32-bit floats hold, a few voxels at absurd
intensities, or phase/wrapped values in a magnitude image (negative voxels, or an unsigned
phase encoding without a dark background). Each check looks at one volume alone (never
at site statistics) and either refuses it (`ContentError`, the message is the reason) or
returns a warning.
"""

from __future__ import annotations

import numpy as np

from fedsynth.common.errors import FedsynthError

# a label map or mask holds at most this many distinct values (ACDC/M&Ms/UK Biobank: 4)
MAX_LABEL_VALUES = 16
# a volume of at most this many distinct values (any scale: labels/3, a 0/0.5 mask, 40
# segmentation classes) is a label map if it is piecewise constant (below)
MAX_PIECEWISE_VALUES = 256
# ... that is, if more than this fraction of its foreground voxels (those not of its most
# common value) equal a neighbour along some axis: regions of one label are constant, while
# an MR image's noise makes neighbours differ (phantom scans as uint8, even 0-50: under 70%)
MIN_CONSTANT_FRACTION = 0.9
# below this fraction of voxels differing from the median, a volume is blank
MIN_CONTENT_FRACTION = 0.01
# a voxel this many percentile ranges (0.5th to 99.5th) beyond the range is an outlier
OUTLIER_RANGES = 100.0
# above this fraction of negative voxels a magnitude image is suspect (noise floor aside)
MAX_NEGATIVE_FRACTION = 0.01
# a magnitude image has a dark background (air, lungs): more than this fraction of its
# voxels in the lowest tenth of its 0.5-99.5 percentile range ...
MIN_DARK_FRACTION = 0.15
# ... whereas a phase image (Siemens stores -pi..pi as 0-4095) spreads its voxels nearly
# uniformly: every tenth of its range holds at least this fraction of them
MIN_TENTH_FRACTION = 0.04


class ContentError(FedsynthError):
    """A volume whose content is no usable image; the message is the reason."""


def check_content(data: np.ndarray) -> list[str]:
    """Refuse (ContentError) what cannot be an MR magnitude image; warn about the doubtful.

    `data` is one finite, non-constant volume (any shape), as decoded from the file and
    converted to float32 (see data.read_nifti). Returns the warnings, one-line reasons.
    """
    median = np.median(data)
    content = int(np.count_nonzero(data != median))
    if content < MIN_CONTENT_FRACTION * data.size:
        raise ContentError(
            f"nearly blank: {content} of {data.size} voxels differ from the background "
            f"{float(median):g}"
        )
    values = _few_values(data, MAX_PIECEWISE_VALUES)
    if values is not None and len(values) > 1:
        shown = ", ".join(f"{v:g}" for v in values[:8]) + (", ..." if len(values) > 8 else "")
        if len(values) <= MAX_LABEL_VALUES and np.all(values == np.round(values)):
            raise ContentError(
                f"looks like a label map, not an image: only {len(values)} distinct integer "
                f"values ({shown})"
            )
        if _piecewise_constant(data, values):
            raise ContentError(
                f"looks like a label map, not an image: {len(values)} distinct values "
                f"({shown}) in constant regions"
            )
    warnings = []
    low, high = _outlier_bounds(data)
    outliers = int(np.count_nonzero((data < low) | (data > high)))
    if outliers:
        warnings.append(
            f"{outliers} voxels lie far outside the intensity range (up to "
            f"{float(np.max(np.abs(data))):.3g}; 99.5th percentile "
            f"{float(np.percentile(data, 99.5)):g}): clipped before scaling"
        )
    negative = int(np.count_nonzero(data < 0))
    if negative > MAX_NEGATIVE_FRACTION * data.size:
        warnings.append(
            f"{100 * negative / data.size:.0f}% of voxels are negative, which a magnitude "
            "image never is: phase, signed or wrapped values?"
        )
    elif _phase_like(data):
        warnings.append(
            "no dark background: intensities spread evenly over the whole range, as in a "
            "phase image (a scanner's unsigned phase, e.g. 0-4095), not a magnitude image"
        )
    return warnings


def _few_values(data: np.ndarray, most: int) -> np.ndarray | None:
    """The distinct values of `data` if there are at most `most`, else None.

    A strided sample decides most volumes (a scan has thousands of values) without
    sorting all voxels."""
    sample = np.unique(data.reshape(-1)[:: max(1, data.size // 4096)])
    if len(sample) > most:
        return None
    values = np.unique(data)
    return values if len(values) <= most else None


def _piecewise_constant(data: np.ndarray, values: np.ndarray) -> bool:
    """Whether more than MIN_CONSTANT_FRACTION of the voxels not of the most common value
    (the background) equal one of their neighbours along some axis (a label map's regions),
    `values` being the sorted distinct values of `data`."""
    index = np.searchsorted(values, data.reshape(-1))
    background = values[np.argmax(np.bincount(index, minlength=len(values)))]
    foreground = data != background
    repeated = np.zeros(data.shape, bool)
    for axis in range(data.ndim):
        head = [slice(None)] * data.ndim
        tail = [slice(None)] * data.ndim
        head[axis], tail[axis] = slice(None, -1), slice(1, None)
        equal = data[tuple(head)] == data[tuple(tail)]
        repeated[tuple(head)] |= equal
        repeated[tuple(tail)] |= equal
    total = int(np.count_nonzero(foreground))
    constant = int(np.count_nonzero(repeated & foreground))
    return total > 0 and constant > MIN_CONSTANT_FRACTION * total


def _phase_like(data: np.ndarray) -> bool:
    """Whether `data` has no dark background and fills its 0.5-99.5 percentile range
    nearly evenly (see MIN_DARK_FRACTION, MIN_TENTH_FRACTION): a phase image's histogram,
    while a magnitude image has most voxels dark and few bright."""
    low, high = np.percentile(data, [0.5, 99.5])
    if not high > low:
        return False
    tenths = np.histogram(np.clip(data, low, high), bins=10, range=(low, high))[0] / data.size
    return bool(tenths[0] <= MIN_DARK_FRACTION and tenths.min() >= MIN_TENTH_FRACTION)


def clip_outliers(data: np.ndarray) -> np.ndarray:
    """`data` with voxels beyond the outlier bounds (see `_outlier_bounds`) set to them: a
    few voxels at 1e30 must not dominate the resize and the percentile scaling after it.
    A volume without outliers is returned as it is."""
    low, high = _outlier_bounds(data)
    if float(data.min()) >= low and float(data.max()) <= high:
        return data
    return np.clip(data, low, high)


def _outlier_bounds(data: np.ndarray) -> tuple[float, float]:
    """median -/+ OUTLIER_RANGES times the volume's 0.5th-99.5th percentile range."""
    low, median, high = np.percentile(data, [0.5, 50, 99.5])
    spread = OUTLIER_RANGES * max(float(high - low), float(np.finfo(np.float32).tiny))
    return float(median) - spread, float(median) + spread
