"""Small, hand-made site folders for tests (independent of the phantom generator)."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np

# a valid value for every attribute of the default config
GOOD_ATTRIBUTES = {
    "lvedv": 150,
    "lvesv": 60,
    "lvef": 60,
    "rvedv": 160,
    "rvesv": 70,
    "rvef": 56.2,
    "lv_mass": 120,
    "wall_ed": 9,
    "wall_es": 13,
    "age": 54,
    "sex": 1,
    "bmi": 26.5,
    "phase": 0,
}


def blob_volume(shape=(24, 20, 6), seed=0) -> np.ndarray:
    """A bright ellipsoid on a noisy background: a stand-in for a scan."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = sum(g**2 for g in grid) < 0.5
    return (inside * 1.0 + 0.1 * rng.random(shape)).astype(np.float32)


def save_nifti(path: Path, data: np.ndarray, zooms=(4.0, 4.0, 16.0), affine=None) -> Path:
    """`data` as a NIfTI file; the default zooms make blob_volume()'s 24x20x6 voxels a
    stack the size of a heart's scan (96 x 80 mm in-plane, 96 mm along the slices), which
    the geometry checks (common/plausibility.py) accept."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if affine is None:
        affine = np.diag([*zooms, 1.0])
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def write_site(root: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    """A site folder with manifest.csv holding `rows` (missing attributes filled in)."""
    root.mkdir(parents=True, exist_ok=True)
    full = [{**GOOD_ATTRIBUTES, **row} for row in rows]
    if columns is None:
        columns = ["image", "subject", *GOOD_ATTRIBUTES]
    with (root / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(full)
    return root
