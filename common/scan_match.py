"""The same scan found again among many: one person's volume under another file or id.

A re-export of a scan rarely holds bit-identical voxels: another tool may decode int16
values with scl_slope/scl_inter in float32 arithmetic (a third of the voxels then differ in
the last bit from nibabel's float64 decode), or store a float scan scaled into int16's
full range (values rounded to 1/65535 of its range, as nibabel writes it). An exact hash
of the voxels misses both. Two volumes are therefore the same scan when, in the
short-axis frame (orientation.to_short_axis: the same for any voxel storage order), they
have the same shape and every voxel agrees to `TOLERANCE` of the volume's intensity range.
Different scans of one heart (another noise draw, another phase) differ by far more.
A copy whose header lost its orientation (qform and sform codes 0, as ANALYZE-style writers
and some anonymisers leave it) holds the same stored voxels but reorients differently, so
each scan is also kept in its stored voxel order (`views`), and a volume matches an earlier
scan when either of its two views (short-axis, stored) matches either of the scan's.

The intensity range is robust: the 0.5th to 99.5th percentile range (`robust_range`),
and voxels beyond the outlier bounds are clipped to bounds shared by both volumes before
comparing. A raw max - min would let a few scanner spikes decide it: two different
patients' scans with a 1e30 voxel at the same place would agree "to 1e-5 of the range"
(1e25) everywhere. Percentiles and clipping to shared bounds change by no more than the
voxels do, so a true match stays one.

Comparing each new volume with every earlier one in full would read O(rows^2) volumes, so
each kept scan is summarised by a signature (`Probe.signature`): `SAMPLES` voxels at fixed
strides through the array plus its mean and standard deviation, all in units of its own
robust range from its 0.5th percentile, clipped to `SIGNATURE_CLIP` (an outlier voxel
becomes the same bound in both of two matching scans).
If two volumes agree voxel for voxel to TOLERANCE of the range, their percentiles and so
every clipped normalised value (at most 2 in size) agree to about 6 x TOLERANCE, so a
signature tolerance of 10 x TOLERANCE never loses a match. A new volume is compared with
every earlier signature of its shape at once (numpy, one row per scan), and only the few
candidates that pass are confirmed in full, re-reading the earlier file (scans are not
held in memory).

Everything here runs at the site; nothing of it is sent anywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsynth.common.errors import FedsynthError
from fedsynth.common.orientation import OrientationError, to_short_axis
from fedsynth.common.volume_content import OUTLIER_RANGES

TOLERANCE = 1e-5  # of a volume's intensity range: float32 rounding (6e-8) and int16 storage
SIGNATURE_TOLERANCE = 10 * TOLERANCE  # per normalised signature value; see the docstring
SAMPLES = 128  # strided voxels per signature
# signature values are clipped to this many robust ranges (below, above) the 0.5th percentile
SIGNATURE_CLIP = (-1.0, 2.0)

# reads a volume: (X, Y, Z) voxels and their 4x4 affine; raises FedsynthError or OSError
Loader = Callable[[Path], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Probe:
    """A volume prepared for matching: short-axis voxels and their signature."""

    voxels: np.ndarray  # (rows, columns, slices), as decoded; or (X, Y, Z) as stored
    signature: np.ndarray  # (SAMPLES + 2,) float64, in units of the volume's range
    oriented: bool = True  # short-axis view (False: the stored voxel order)


def oriented(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """A volume's voxels in the short-axis frame; ValueError for an affine that gives none."""
    try:
        return to_short_axis(data, affine)[0]
    except OrientationError as exc:
        raise ValueError(str(exc)) from None


def probe(data: np.ndarray, affine: np.ndarray) -> Probe:
    """The `Probe` of a decoded volume (X, Y, Z) with its affine; ValueError for an affine
    that gives no short-axis frame."""
    return _signed(oriented(data, affine), True)


def views(data: np.ndarray, affine: np.ndarray) -> list[Probe]:
    """A decoded volume's (X, Y, Z) views to match by: its `probe`, and the stored voxel
    order (header aside) where that differs; ValueError as `probe`."""
    short_axis = probe(data, affine)
    same = short_axis.voxels.shape == data.shape and np.array_equal(short_axis.voxels, data)
    return [short_axis] if same else [short_axis, _signed(data, False)]


def _signed(voxels: np.ndarray, short_axis: bool) -> Probe:
    """A view of a volume with its signature (in units of its robust range, clipped)."""
    low, span = robust_range(voxels)
    normalised = np.clip((voxels.astype(np.float64) - low) / span, *SIGNATURE_CLIP)
    where = np.unravel_index(
        np.linspace(0, voxels.size - 1, SAMPLES).round().astype(int), voxels.shape
    )
    moments = np.array([normalised.mean(), normalised.std()])
    return Probe(voxels, np.concatenate([normalised[where], moments]), short_axis)


def robust_range(voxels: np.ndarray) -> tuple[float, float]:
    """A volume's 0.5th percentile and its 0.5th-99.5th percentile range; the full range
    where that is 0 (a mostly constant volume), and a span of 1 for a constant one."""
    low, high = (float(v) for v in np.percentile(voxels, [0.5, 99.5]))
    if high > low:
        return low, high - low
    low, high = float(voxels.min()), float(voxels.max())
    return low, (high - low) if high > low else 1.0


def same_scan(a: np.ndarray, b: np.ndarray) -> bool:
    """Two short-axis volumes of one shape agree voxel for voxel to TOLERANCE of the larger
    of their robust ranges, after clipping both to the wider of their outlier bounds
    (OUTLIER_RANGES robust ranges beyond them; shared bounds, so a spike in both compares
    equal)."""
    (low_a, span_a), (low_b, span_b) = robust_range(a), robust_range(b)
    low = min(low_a - OUTLIER_RANGES * span_a, low_b - OUTLIER_RANGES * span_b)
    high = max(low_a + (1 + OUTLIER_RANGES) * span_a, low_b + (1 + OUTLIER_RANGES) * span_b)
    clipped_a, clipped_b = (np.clip(v.astype(np.float64), low, high) for v in (a, b))
    difference = np.abs(clipped_a - clipped_b)
    return float(difference.max()) <= TOLERANCE * max(span_a, span_b)


class _Bucket:
    """The signatures of the views (ScanIndex.views) of one shape, one row each (grown by
    doubling)."""

    def __init__(self, width: int) -> None:
        self.signatures = np.empty((8, width))
        self.scans: list[int] = []

    def add(self, signature: np.ndarray, scan: int) -> None:
        if len(self.scans) == len(self.signatures):
            self.signatures = np.concatenate([self.signatures, np.empty_like(self.signatures)])
        self.signatures[len(self.scans)] = signature
        self.scans.append(scan)

    def candidates(self, signature: np.ndarray) -> list[int]:
        """Views (ScanIndex.views) whose signature is within SIGNATURE_TOLERANCE everywhere,
        earliest first."""
        kept = self.signatures[: len(self.scans)]
        # mean and spread first: two columns, then the survivors in full
        rows = np.flatnonzero(_within(kept[:, SAMPLES:], signature[SAMPLES:]))
        rows = rows[_within(kept[rows], signature)]
        return [self.scans[i] for i in rows]


def _within(signatures: np.ndarray, signature: np.ndarray) -> np.ndarray:
    """Which rows of `signatures` are within SIGNATURE_TOLERANCE of `signature` everywhere."""
    return np.abs(signatures - signature).max(axis=1) <= SIGNATURE_TOLERANCE


class ScanIndex:
    """The distinct scans seen so far (numbered 0, 1, ... in the order added), each known by
    its file and the signatures of its views. `load` re-reads an earlier scan's file to
    confirm a candidate."""

    def __init__(self, load: Loader) -> None:
        self.load = load
        self.paths: list[Path] = []
        self.views: list[tuple[int, bool]] = []  # (scan, short-axis view?), by view number
        self.buckets: dict[tuple[int, ...], _Bucket] = {}

    def find(self, volume: Sequence[Probe]) -> int | None:
        """The scan one of whose views one of the volume's `views` is the same as (see
        `same_scan`; the earliest for the first view that matches), or None. An earlier file
        that can no longer be read (changed since) matches nothing."""
        return next((s for v in volume if (s := self._find(v)) is not None), None)

    def _find(self, volume: Probe) -> int | None:
        """`find` for one view."""
        bucket = self.buckets.get(volume.voxels.shape)
        for view in bucket.candidates(volume.signature) if bucket is not None else []:
            scan, short_axis = self.views[view]
            try:
                data, affine = self.load(self.paths[scan])
                earlier = oriented(data, affine) if short_axis else data
            except (FedsynthError, OSError, ValueError):
                continue
            if earlier.shape == volume.voxels.shape and same_scan(earlier, volume.voxels):
                return scan
        return None

    def add(self, volume: Sequence[Probe], path: Path) -> int:
        """Keep a volume (read from `path`) as a new scan, known by its `views`; returns its
        number."""
        scan = len(self.paths)
        for view in volume:
            shape = view.voxels.shape
            bucket = self.buckets.setdefault(shape, _Bucket(view.signature.size))
            bucket.add(view.signature, len(self.views))
            self.views.append((scan, view.oriented))
        self.paths.append(path)
        return scan
