"""Is a decoded volume an MR magnitude image? Checks of content, not format.

A file can be a valid NIfTI volume and still not be what the image column promises: a
label map (a handful of integer values), a blank volume with a stray voxel, values beyond
what 32-bit floats hold, a few voxels at absurd intensities, or phase/wrapped values in a
magnitude image. Each check looks at one volume alone (never at site statistics) and
either refuses it (`ContentError`, the message is the reason) or returns a warning.
"""

from __future__ import annotations

import numpy as np

from fedsynth.common.errors import FedsynthError

# a label map or mask holds at most this many distinct values (ACDC/M&Ms/UK Biobank: 4)
MAX_LABEL_VALUES = 16
# below this fraction of voxels differing from the median, a volume is blank
MIN_CONTENT_FRACTION = 0.01
# a voxel this many percentile ranges (0.5th to 99.5th) beyond the range is an outlier
OUTLIER_RANGES = 100.0
# above this fraction of negative voxels a magnitude image is suspect (noise floor aside)
MAX_NEGATIVE_FRACTION = 0.01


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
    values = _few_values(data)
    if values is not None and np.all(values == np.round(values)) and len(values) > 1:
        shown = ", ".join(f"{v:g}" for v in values[:8]) + (", ..." if len(values) > 8 else "")
        raise ContentError(
            f"looks like a label map, not an image: only {len(values)} distinct integer "
            f"values ({shown})"
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
    return warnings


def _few_values(data: np.ndarray) -> np.ndarray | None:
    """The distinct values of `data` if there are at most MAX_LABEL_VALUES, else None.

    A strided sample decides most volumes (a scan has thousands of values) without
    sorting all voxels."""
    sample = np.unique(data.reshape(-1)[:: max(1, data.size // 4096)])
    if len(sample) > MAX_LABEL_VALUES:
        return None
    values = np.unique(data)
    return values if len(values) <= MAX_LABEL_VALUES else None


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
