"""Parametric 3D short-axis cardiac MRI phantoms: hospital-like sites whose data no one may share.

Each subject's clinical attributes are drawn from correlated distributions (sex -> body
size -> LV volume, age -> ejection fraction, site-specific disease prevalence) and then
DRIVE the anatomy: cavity and myocardium sizes are calibrated by bisection on the voxel
grid, so the label map measures what the manifest states. Sites differ in scanner
contrast, gain, noise, bias field, matrix, slice count and demographics (non-IID); the
public set differs again (domain shift), as public data does.

Geometry follows the short-axis frame of common/orientation.py: arrays are (rows, columns,
slices) with slice 0 at the base and higher slices towards the apex; each subject's LV long
axis points left, anterior and inferior (orientation.APEX, tilted by up to 25 degrees), and
the NIfTI affine places the stack along it, so every stack is oblique and the reader brings
it back to the stored array. In mm, in that frame: the LV cavity is a half prolate
ellipsoid below the mitral valve plane, the myocardium a shell around it with an apical
cap, the RV an offset half ellipsoid minus the LV epicardium (a crescent on the
septal side), inside a chest with a fat rim, muscle, lungs, spine, aorta and liver.
Every shape is stored as per-slice thresholds so that counting a volume and drawing it
use exactly the same numbers. Labels (LABELS): 0 air, 1 RV blood pool, 2 LV myocardium,
3 LV blood pool (papillary muscles included), 4 other tissue (atria and great vessels
too), 5 lungs.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import math
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from fedsynth.common.errors import FedsynthError
from fedsynth.common.io import PUBLIC_MODE, atomic_path, atomic_write_text
from fedsynth.common.orientation import APEX, short_axis_affine
from fedsynth.common.progress import progress as progress_bar

ATTRIBUTES = (
    "lvedv",
    "lvesv",
    "lvef",
    "rvedv",
    "rvesv",
    "rvef",
    "lv_mass",
    "wall_ed",
    "wall_es",
    "age",
    "sex",
    "bmi",
    "phase",
)
RANGES: dict[str, tuple[float, float]] = {
    "lvedv": (40, 400),
    "lvesv": (10, 350),
    "lvef": (10, 85),
    "rvedv": (40, 400),
    "rvesv": (10, 350),
    "rvef": (10, 85),
    "lv_mass": (30, 300),
    "wall_ed": (3, 20),
    "wall_es": (4, 30),
    "age": (18, 95),
    "sex": (0, 1),
    "bmi": (14, 50),
    "phase": (0, 1),
}
MANIFEST_COLUMNS = ("image", "label", "subject", *ATTRIBUTES)
LABELS = {"background": 0, "rv_blood": 1, "lv_myocardium": 2, "lv_blood": 3, "tissue": 4, "lung": 5}
MYOCARDIAL_DENSITY = 1.05  # g/mL
SLICE_SPACING_MM = (8.0, 11.0)
LONG_AXIS_TILT_DEG = 25.0  # spread of the LV long axis around orientation.APEX
# Bump when generated files change: part of the phantom cache folder name (server).
PHANTOM_VERSION = 2  # 2: oblique short-axis affines, apex inferior (1: apex superior)
CALIBRATION_TOLERANCE = 0.02  # relative; a subject whose anatomy misses it is drawn again

# Tissue classes of the intensity model; a profile's contrast gives one intensity for each.
AIR, FAT, MUSCLE, LUNG, BLOOD, MYO, LIVER, BONE = range(8)
DISEASES = ("healthy", "dilated", "ischaemic", "hypertrophic")


@dataclass(frozen=True)
class SiteProfile:
    """What makes one site's scans and patients differ from another's (non-IID)."""

    name: str
    matrix: int  # in-plane pixels, square
    pixel_mm: float
    slices: int
    contrast: tuple[float, ...]  # intensity per tissue class (AIR..BONE), blood about 1
    gain: float  # scanner intensity units
    noise: float  # Rician sigma relative to blood
    bias: float  # strength of the smooth multiplicative bias field
    psf: float  # in-plane Gaussian blur, pixels
    age: tuple[float, float]  # mean, sd (years)
    male: float  # fraction of men
    bmi: tuple[float, float]  # mean, sd (kg/m2)
    prevalence: tuple[float, float, float]  # dilated, ischaemic (low EF), hypertrophic


BASE_SITES = (
    SiteProfile(
        "site-1",
        96,
        2.0,
        12,
        (0, 0.80, 0.30, 0.04, 1.0, 0.26, 0.38, 0.45),
        1000.0,
        0.035,
        0.15,
        0.7,
        (52, 13),
        0.55,
        (26.0, 4.0),
        (0.05, 0.08, 0.05),
    ),
    SiteProfile(
        "site-2",
        88,
        2.3,
        10,
        (0, 0.95, 0.36, 0.07, 1.0, 0.30, 0.46, 0.50),
        350.0,
        0.06,
        0.30,
        0.9,
        (64, 11),
        0.70,
        (28.5, 5.0),
        (0.25, 0.20, 0.05),
    ),
    SiteProfile(
        "site-3",
        104,
        1.9,
        14,
        (0, 0.70, 0.27, 0.03, 1.0, 0.22, 0.33, 0.40),
        2400.0,
        0.025,
        0.20,
        0.6,
        (58, 12),
        0.45,
        (30.0, 5.5),
        (0.04, 0.10, 0.25),
    ),
)
PUBLIC = SiteProfile(
    "public",
    96,
    2.1,
    13,
    (0, 0.62, 0.40, 0.09, 0.90, 0.31, 0.52, 0.55),
    1.0,
    0.05,
    0.25,
    1.0,
    (50, 18),
    0.50,
    (26.0, 5.5),
    (0.06, 0.06, 0.06),
)
_MATRICES = ((88, 2.3), (96, 2.0), (104, 1.9), (112, 1.75))


def site_profiles(sites: int, seed: int) -> list[SiteProfile]:
    """Profiles of site-1..K: three fixed ones, the rest derived deterministically from the seed."""
    return [BASE_SITES[k - 1] if k <= 3 else _derived_profile(k, seed) for k in range(1, sites + 1)]


def _derived_profile(k: int, seed: int) -> SiteProfile:
    """A further site: one of the fixed ones with its scanner and population perturbed."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(k, 0)))
    base = BASE_SITES[int(rng.integers(3))]
    matrix, pixel = _MATRICES[int(rng.integers(len(_MATRICES)))]
    contrast = tuple(
        c if i in (AIR, BLOOD) else round(c * rng.uniform(0.8, 1.2), 3)
        for i, c in enumerate(base.contrast)
    )
    prevalence = rng.dirichlet((12.0, 1.0, 1.0, 1.0))[1:] * rng.uniform(0.5, 1.5)
    return replace(
        base,
        name=f"site-{k}",
        matrix=matrix,
        pixel_mm=pixel,
        slices=int(rng.integers(10, 15)),
        contrast=contrast,
        gain=float(10 ** rng.uniform(0, 3.5)),
        noise=float(rng.uniform(0.02, 0.07)),
        bias=float(rng.uniform(0.1, 0.35)),
        psf=float(rng.uniform(0.5, 1.0)),
        age=(float(rng.uniform(45, 68)), float(rng.uniform(9, 15))),
        male=float(rng.uniform(0.35, 0.75)),
        bmi=(float(rng.uniform(24, 31)), float(rng.uniform(3.5, 6))),
        prevalence=tuple(float(p) for p in prevalence),
    )


# ---------------------------------------------------------------------------------- attributes


@dataclass(frozen=True)
class Clinical:
    """A subject's drawn clinical state; anatomy is built from it, the manifest reports it."""

    sex: int
    age: int
    bmi: float
    disease: str
    lvedv: float
    lvesv: float
    rvedv: float
    rvesv: float
    wall_ed: float  # target ED wall thickness (mm); sets the LV mass

    @property
    def lvef(self) -> float:
        return round(100 * (self.lvedv - self.lvesv) / self.lvedv, 1)

    @property
    def rvef(self) -> float:
        return round(100 * (self.rvedv - self.rvesv) / self.rvedv, 1)


def draw_clinical(rng: np.random.Generator, profile: SiteProfile) -> Clinical:
    """Correlated attributes: sex -> height/BMI -> body surface -> volumes; age -> EF and wall."""
    sex = int(rng.random() < profile.male)
    age = round(float(np.clip(rng.normal(*profile.age), 18, 92)))
    bmi = float(np.clip(rng.normal(profile.bmi[0] + 0.8 * sex, profile.bmi[1]), 16.0, 46.0))
    height = rng.normal(1.76 if sex else 1.63, 0.065)
    bsa = math.sqrt(height * 100 * bmi * height**2 / 3600)  # Mosteller, m2
    risk = np.asarray(profile.prevalence) * (0.6 + 0.8 * (age - 18) / 70)
    weights = np.array([max(0.0, 1 - risk.sum()), *risk])
    disease = DISEASES[int(rng.choice(4, p=weights / weights.sum()))]

    edv_index = rng.normal(82 if sex else 73, 9) - 0.2 * (age - 50)
    lvedv = edv_index * bsa
    lvef = rng.normal(63 + 0.06 * (age - 50), 4.5)
    wall = rng.normal(9.2 if sex else 7.9, 0.8) + 0.025 * (age - 50) + 0.06 * (bmi - 26)
    rv_ratio, rvef = rng.normal(1.08, 0.07), rng.normal(60 - 0.05 * (age - 50), 5)
    if disease == "dilated":
        lvedv *= rng.uniform(1.5, 2.1)
        lvef, wall, rv_ratio = rng.uniform(15, 40), wall * 0.85, rv_ratio * 0.75
        rvef = lvef + rng.normal(12, 6)
    elif disease == "ischaemic":
        lvedv *= rng.uniform(1.05, 1.4)
        lvef, rv_ratio = rng.uniform(25, 48), rv_ratio * 0.85
        rvef = lvef + rng.normal(10, 6)
    elif disease == "hypertrophic":
        lvedv *= rng.uniform(0.75, 0.95)
        lvef, wall, rv_ratio = rng.normal(70, 4), wall * rng.uniform(1.4, 1.8), rv_ratio * 1.15
    lvedv = round(float(np.clip(lvedv, 50, 380)), 1)
    rvedv = round(float(np.clip(lvedv * rv_ratio, 50, 380)), 1)
    lvesv = round(lvedv * (1 - float(np.clip(lvef, 12, 80)) / 100), 1)
    rvesv = round(rvedv * (1 - float(np.clip(rvef, 15, 78)) / 100), 1)
    return Clinical(
        sex, age, round(bmi, 1), disease, lvedv, lvesv, rvedv, rvesv, float(np.clip(wall, 5, 17))
    )


# ------------------------------------------------------------------------------------ geometry


@dataclass(frozen=True)
class Grid:
    """Pixel centres in mm in the short-axis frame: rows y run from the anterior to the
    inferior wall, columns x from the right ventricle's side to the lateral wall (patient's
    left), slices z from base to apex (orientation.py)."""

    y: np.ndarray  # (n, n)
    x: np.ndarray  # (n, n)
    z: np.ndarray  # (slices,) slice centres, 0 at the top (base) of the stack
    spacing: tuple[float, float, float]

    @property
    def voxel_ml(self) -> float:
        return self.spacing[0] * self.spacing[1] * self.spacing[2] / 1000


@dataclass(frozen=True)
class Phase:
    """One cardiac phase as per-slice thresholds (-1: absent), shared by counting and drawing."""

    lv_base: float  # z of the mitral valve plane
    rv_base: float  # z of the tricuspid valve plane
    lv_r2: np.ndarray  # squared LV cavity radius per slice
    epi_r2: np.ndarray  # squared LV epicardial radius per slice
    rv_t: np.ndarray  # RV half ellipsoid: pixel inside when q0 <= rv_t
    wall: float  # LV wall thickness, mm


@dataclass(frozen=True)
class Heart:
    """A subject's heart: fixed axes plus its ED and ES phases."""

    centre: tuple[float, float]  # LV long axis, in-plane (y, x) mm
    d2: np.ndarray  # squared in-plane distance from the LV long axis (n, n)
    rv_angle: float  # direction from the LV to the RV, radians above the image's left
    rv_uv: tuple[np.ndarray, np.ndarray]  # coordinates along / across the LV-RV direction
    rv_axes: tuple[float, float]  # RV ellipse semi-axes before per-slice scaling (mm)
    r_epi: float  # ED basal epicardial radius, the heart's overall scale
    apex: float  # z of the epicardial apex (fixed through the cycle)
    ed: Phase
    es: Phase

    @property
    def q0(self) -> np.ndarray:
        """1 on the unscaled RV ellipse; a pixel is RV where q0 <= the slice's rv_t."""
        return (self.rv_uv[0] / self.rv_axes[0]) ** 2 + (self.rv_uv[1] / self.rv_axes[1]) ** 2


def half_ellipsoid_r2(z: np.ndarray, base: float, length: float, radius: float) -> np.ndarray:
    """Squared radius per slice of a half prolate ellipsoid from `base` to its apex; -1 off it."""
    t = (z - base) / length
    return np.where((t >= 0) & (t <= 1), radius**2 * (1 - t**2), -1.0)


def _count(sorted_values: np.ndarray, thresholds: np.ndarray) -> int:
    """Pixels with value <= threshold, summed over slices (sorted_values: one 1-D array)."""
    return int(np.searchsorted(sorted_values, thresholds, side="right").sum())


def _bisect(
    f: Callable[[float], float], target: float, lo: float, hi: float, iters: int = 36
) -> float:
    """The x in [lo, hi] whose increasing, step-wise f(x) comes closest to target."""
    best_x, best_err = lo, math.inf
    for _ in range(iters):
        mid = (lo + hi) / 2
        value = f(mid)
        if abs(value - target) < best_err:
            best_x, best_err = mid, abs(value - target)
        lo, hi = (mid, hi) if value < target else (lo, mid)
    return best_x


class AnatomyError(Exception):
    """The drawn attributes do not fit this grid; the subject is drawn again."""


def build_heart(
    clinical: Clinical, grid: Grid, centre: tuple[float, float], shape: dict[str, float]
) -> Heart:
    """Calibrate LV cavity, myocardium and RV on the grid to the clinical volumes and mass."""
    vox = grid.voxel_ml
    d2 = (grid.y - centre[0]) ** 2 + (grid.x - centre[1]) ** 2
    sd2 = np.sort(d2.ravel())
    z = grid.z

    def lv_count(base: float, length: float, radius: float) -> int:
        return _count(sd2, half_ellipsoid_r2(z, base, length, radius))

    myo_ml = lv_mass(clinical) / MYOCARDIAL_DENSITY
    # ED: the long axis is fixed by design; radius then wall thickness are calibrated.
    base, length = shape["base"], shape["length"]
    r_guess = math.sqrt(3 * clinical.lvedv * 1000 / (2 * math.pi * length))
    radius = _bisect(
        lambda r: lv_count(base, length, r), clinical.lvedv / vox, 0.4 * r_guess, 1.8 * r_guess
    )
    cavity = lv_count(base, length, radius)
    wall = _bisect(
        lambda w: lv_count(base, length + w, radius + w) - cavity, myo_ml / vox, 1.0, 30.0
    )
    ed_lv = (
        half_ellipsoid_r2(z, base, length, radius),
        half_ellipsoid_r2(z, base, length + wall, radius + wall),
    )

    # ES: the base descends towards a fixed apex; the wall thickens to conserve myocardium.
    es_base = base + shape["descent"]
    epi_length = base + length + wall - es_base

    def es_radius(w: float) -> float:
        guess = math.sqrt(3 * clinical.lvesv * 1000 / (2 * math.pi * (epi_length - w)))
        return _bisect(
            lambda r: lv_count(es_base, epi_length - w, r),
            clinical.lvesv / vox,
            0.3 * guess,
            2 * guess,
        )

    def es_myo(w: float) -> int:
        r = es_radius(w)
        return lv_count(es_base, epi_length, r + w) - lv_count(es_base, epi_length - w, r)

    es_wall = _bisect(es_myo, myo_ml / vox, wall, min(0.8 * epi_length, 40.0), iters=28)
    es_r = es_radius(es_wall)
    es_lv = (
        half_ellipsoid_r2(z, es_base, epi_length - es_wall, es_r),
        half_ellipsoid_r2(z, es_base, epi_length, es_r + es_wall),
    )

    # RV: an ellipse centred beside the septum, scaled until the crescent holds the volume.
    r_epi = radius + wall
    angle = shape["rv_angle"]
    u = (-math.sin(angle), -math.cos(angle))  # towards the image left and anterior
    offset = shape["rv_offset"] * r_epi
    rv_centre = (centre[0] + u[0] * offset, centre[1] + u[1] * offset)
    dy, dx = grid.y - rv_centre[0], grid.x - rv_centre[1]
    rv_uv = (dy * u[0] + dx * u[1], dx * u[0] - dy * u[1])
    rv_axes = (1.2 * r_epi, shape["rv_width"] * r_epi)
    q0 = (rv_uv[0] / rv_axes[0]) ** 2 + (rv_uv[1] / rv_axes[1]) ** 2
    rv_length = shape["rv_length"] * (length + wall)

    def rv_t(rv_base: float, rv_len: float, epi_r2: np.ndarray, ml: float) -> np.ndarray:
        outside = [np.sort(q0[d2 > e]) for e in epi_r2]

        def count(s: float) -> int:
            t = half_ellipsoid_r2(z, rv_base, rv_len, s)
            return sum(
                int(np.searchsorted(o, tk, "right")) for o, tk in zip(outside, t, strict=True)
            )

        return half_ellipsoid_r2(z, rv_base, rv_len, _bisect(count, ml / vox, 0.2, 3.0))

    rv_es_base = base + shape["rv_descent"]
    rv_es_length = base + rv_length - rv_es_base
    heart = Heart(
        centre,
        d2,
        angle,
        rv_uv,
        rv_axes,
        r_epi,
        base + length + wall,
        Phase(base, base, *ed_lv, rv_t(base, rv_length, ed_lv[1], clinical.rvedv), wall),
        Phase(
            es_base,
            rv_es_base,
            *es_lv,
            rv_t(rv_es_base, rv_es_length, es_lv[1], clinical.rvesv),
            es_wall,
        ),
    )
    _check(heart, clinical, vox)
    return heart


def lv_mass(clinical: Clinical) -> float:
    """LV mass (g) of a reference shell (aspect-2 cavity of LVEDV, target wall thickness).

    The anatomy is calibrated to this mass, so the realised wall (reported as wall_ed)
    differs a little from the target where the subject's LV is rounder or longer.
    """
    aspect = 2.0
    r = (3 * clinical.lvedv * 1000 / (2 * math.pi * aspect)) ** (1 / 3)
    w = clinical.wall_ed
    shell_mm3 = 2 / 3 * math.pi * ((r + w) ** 2 * (aspect * r + w) - r**2 * aspect * r)
    return round(shell_mm3 / 1000 * MYOCARDIAL_DENSITY, 1)


def measure(heart: Heart, phase: Phase, voxel_ml: float) -> dict[str, float]:
    """LV cavity, RV cavity (mL) and LV mass (g) as the label map will count them."""
    lv = int((heart.d2[..., None] <= phase.lv_r2).sum())
    epi = int((heart.d2[..., None] <= phase.epi_r2).sum())
    rv = int(((heart.q0[..., None] <= phase.rv_t) & (heart.d2[..., None] > phase.epi_r2)).sum())
    return {
        "lv": lv * voxel_ml,
        "rv": rv * voxel_ml,
        "mass": (epi - lv) * voxel_ml * MYOCARDIAL_DENSITY,
    }


def _check(heart: Heart, clinical: Clinical, vox: float) -> None:
    """Refuse a heart whose counted volumes miss the attributes (e.g. clipped by the FOV)."""
    mass = lv_mass(clinical)
    for phase, lv, rv in (
        (heart.ed, clinical.lvedv, clinical.rvedv),
        (heart.es, clinical.lvesv, clinical.rvesv),
    ):
        got = measure(heart, phase, vox)
        for key, want in (("lv", lv), ("rv", rv), ("mass", mass)):
            if abs(got[key] - want) > CALIBRATION_TOLERANCE * want:
                raise AnatomyError(f"{key} {got[key]:.1f} != {want:.1f}")


def design(
    clinical: Clinical, profile: SiteProfile, rng: np.random.Generator
) -> tuple[Grid, tuple[float, float], dict[str, float]]:
    """Choose slice spacing, LV position and shape so that the whole LV fits the stack."""
    aspect = rng.normal(2.05, 0.12) * (0.8 if clinical.disease == "dilated" else 1.0)
    length = aspect * (3 * clinical.lvedv * 1000 / (2 * math.pi * aspect)) ** (1 / 3)
    wall, slices = clinical.wall_ed, profile.slices
    above = rng.uniform(0.6, 0.95)  # base plane this many slices below slice 0 (atria above)
    room = (slices - 1 - above) / 1.08  # 8% spare for calibration and the apical cap
    dz = max((length + wall) / room, rng.uniform(*SLICE_SPACING_MM) - 1.5, SLICE_SPACING_MM[0])
    if dz > SLICE_SPACING_MM[1]:  # no room: a rounder LV of the same volume
        dz = SLICE_SPACING_MM[1]
        length = dz * room - wall
    dz = round(dz, 2)
    n, px = profile.matrix, profile.pixel_mm
    c = (np.arange(n) - (n - 1) / 2) * px
    y, x = np.meshgrid(c, c, indexing="ij")
    grid = Grid(y, x, np.arange(slices) * dz, (px, px, dz))
    centre = (rng.uniform(-10.0, 0.0), rng.uniform(6.0, 14.0))
    ef = 1 - clinical.lvesv / clinical.lvedv
    descent = float(np.clip(0.13 * (length + wall) * ef / 0.62, 3, 16) * rng.uniform(0.85, 1.15))
    shape = {
        "base": above * dz,
        "length": length,
        "descent": descent,
        "rv_descent": 1.4 * descent,
        "rv_angle": rng.uniform(0.3, 0.65),  # radians above the horizontal
        "rv_offset": rng.uniform(0.25, 0.4),  # RV ellipse centre, in epicardial radii
        "rv_width": rng.uniform(1.4, 1.65),  # RV ellipse half-width across, same unit
        "rv_length": rng.uniform(0.8, 0.9),  # RV long axis relative to the LV's
    }
    return grid, centre, shape


# ----------------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Body:
    """The chest around the heart: outer ellipse (fat rim), chest-wall muscle, thorax inside."""

    centre: tuple[float, float]
    axes: tuple[float, float]  # outer semi-axes (anterior-posterior, left-right), mm
    fat: float  # subcutaneous fat, mm
    muscle: float  # chest wall, mm


def draw_body(clinical: Clinical, profile: SiteProfile, rng: np.random.Generator) -> Body:
    """Body size and fat rim from BMI and sex, kept inside the field of view."""
    half = profile.matrix * profile.pixel_mm / 2
    size = 0.93 + 0.004 * (clinical.bmi - 26) + 0.02 * clinical.sex + rng.normal(0, 0.01)
    lateral = half * float(np.clip(size, 0.86, 0.98))
    ap = half * float(np.clip(size - 0.07 + rng.normal(0, 0.01), 0.8, 0.92))
    fat = float(np.clip(2 + 0.6 * (clinical.bmi - 22) + 2 * (1 - clinical.sex), 2, 14))
    muscle = float(np.clip(rng.normal(6 + 1.5 * clinical.sex, 1), 4, 10))
    return Body((rng.normal(0, 1.5), rng.normal(0, 1.5)), (ap, lateral), fat, muscle)


def _ellipse(grid: Grid, centre: tuple[float, float], axes: tuple[float, float]) -> np.ndarray:
    """In-plane mask of an axis-aligned ellipse."""
    return ((grid.y - centre[0]) / axes[0]) ** 2 + ((grid.x - centre[1]) / axes[1]) ** 2 <= 1


def _disk(grid: Grid, centre: tuple[float, float], radius: float) -> np.ndarray:
    """In-plane mask of a circle."""
    return _ellipse(grid, centre, (radius, radius))


def render_classes(
    grid: Grid, body: Body, heart: Heart, phase: Phase
) -> tuple[np.ndarray, np.ndarray]:
    """Tissue classes (for intensities) and labels of one phase, painted back to front.

    The ventricles are painted last and exactly as `measure` counts them, so the label map
    holds the calibrated volumes whatever else overlaps.
    """
    n, slices = grid.y.shape[0], grid.z.size
    z = grid.z
    cls = np.full((n, n, slices), AIR, np.uint8)
    lab = np.zeros((n, n, slices), np.uint8)

    def paint(mask: np.ndarray, tissue: int, label: int) -> None:
        mask = np.broadcast_to(mask if mask.ndim == 3 else mask[..., None], cls.shape)
        cls[mask], lab[mask] = tissue, label

    ap, lat = body.axes
    inner_axes = (ap - body.fat - body.muscle, lat - body.fat - body.muscle)
    inner = _ellipse(grid, body.centre, inner_axes)
    paint(_ellipse(grid, body.centre, body.axes), FAT, 4)
    paint(_ellipse(grid, body.centre, (ap - body.fat, lat - body.fat)), MUSCLE, 4)
    spine_c = (body.centre[0] + inner_axes[0] - 4, body.centre[1] - 4)
    aorta_c = (spine_c[0] - 20, spine_c[1] + 17)
    paint(_disk(grid, spine_c, 13), BONE, 4)
    paint(_disk(grid, aorta_c, 10), BLOOD, 4)

    # The heart as a whole (for the lungs' and the pericardial fat's distance to it).
    d2, (cy, cx), r = heart.d2[..., None], heart.centre, heart.r_epi
    u, v = heart.rv_uv[0][..., None], heart.rv_uv[1][..., None]
    rv_scale = np.sqrt(np.maximum(phase.rv_t, 0))
    rv_outer = (
        (u / (rv_scale * heart.rv_axes[0] + 3)) ** 2 + (v / (rv_scale * heart.rv_axes[1] + 3)) ** 2
        <= 1
    ) & (phase.rv_t > 0)
    atrial = (z < phase.lv_base)[None, None, :]
    grow = 1.1 if phase is heart.es else 1.0
    la = _disk(grid, (cy + 0.35 * r, cx + 0.1 * r), 0.72 * r * grow)[..., None] & atrial
    ra_c = (
        cy + 0.1 * r - 1.1 * r * math.sin(heart.rv_angle),
        cx - 1.1 * r * math.cos(heart.rv_angle),
    )
    ra = _disk(grid, ra_c, 0.62 * r * grow)[..., None] & (z < phase.rv_base)
    ao = _disk(grid, (cy - 0.5 * r, cx - 0.45 * r), 0.33 * r)[..., None] & atrial
    heart_mask = (d2 <= phase.epi_r2) | rv_outer | la | ra | ao
    dist = ndimage.distance_transform_edt(~heart_mask, sampling=(*grid.spacing[:2], 1e4))

    lungs = np.zeros(inner.shape, bool)
    for side in (-1, 1):
        lung_c = (
            body.centre[0] + 0.12 * inner_axes[0],
            body.centre[1] + side * 0.5 * inner_axes[1],
        )
        lungs |= _ellipse(grid, lung_c, (0.85 * inner_axes[0], 0.55 * inner_axes[1]))
    lungs &= inner & ~_disk(grid, spine_c, 17) & ~_disk(grid, aorta_c, 13)
    paint(lungs[..., None] & (dist > 5), LUNG, 5)

    # Towards the apex the diaphragm dome and the liver rise into the lower image.
    span = heart.apex - heart.ed.lv_base
    rise = np.clip((z - heart.ed.lv_base - 0.4 * span) / span, 0, 1)[None, None, :]
    dome_y = body.centre[0] + 1.1 * inner_axes[0]
    dome = ((grid.y[..., None] - dome_y) / (1.6 * inner_axes[0] * rise + 1e-6)) ** 2 + (
        (grid.x[..., None] - body.centre[1] + 0.3 * inner_axes[1]) / (1.1 * inner_axes[1])
    ) ** 2 <= 1
    paint(inner[..., None] & dome & ~_disk(grid, spine_c, 14)[..., None], LIVER, 4)
    paint(inner[..., None] & (dist > 0) & (dist <= 2.5), FAT, 4)

    for chamber in (la, ra, ao):
        paint(chamber, MYO, 4)
        paint(ndimage.binary_erosion(chamber, np.ones((3, 3, 1), bool)), BLOOD, 4)
    paint(rv_outer, MYO, 4)
    paint((heart.q0[..., None] <= phase.rv_t) & (d2 > phase.epi_r2), BLOOD, 1)
    paint(d2 <= phase.epi_r2, MYO, 2)
    paint(d2 <= phase.lv_r2, BLOOD, 3)
    cls[_papillary(grid, heart, phase)] = MYO  # dark in the image, blood pool in the labels
    return cls, lab


def _papillary(grid: Grid, heart: Heart, phase: Phase) -> np.ndarray:
    """Two papillary muscles in the mid-cavity slices (image only: labelled as blood pool)."""
    mask = np.zeros((*grid.y.shape, grid.z.size), bool)
    cavity_slices = np.flatnonzero(phase.lv_r2 > 0)
    for k in cavity_slices[len(cavity_slices) // 4 : max(1, 3 * len(cavity_slices) // 4)]:
        r = math.sqrt(phase.lv_r2[k])
        for dy, dx in ((-0.5, 0.85), (0.8, -0.3)):
            centre = (heart.centre[0] + 0.6 * r * dy, heart.centre[1] + 0.6 * r * dx)
            mask[..., k] |= _disk(grid, centre, 0.16 * r)
    return mask & (heart.d2[..., None] <= phase.lv_r2)


@dataclass(frozen=True)
class Scanner:
    """Per-subject acquisition fields shared by ED and ES (same session, same coil)."""

    texture: np.ndarray  # smooth multiplicative tissue texture
    bias: np.ndarray  # smooth multiplicative coil bias field


def draw_scanner(grid: Grid, profile: SiteProfile, rng: np.random.Generator) -> Scanner:
    """Tissue texture and a low-order polynomial bias field of the site's strength."""
    shape = (*grid.y.shape, grid.z.size)
    texture = ndimage.gaussian_filter(rng.standard_normal(shape), (1.5, 1.5, 0))
    texture = 1 + 0.06 * texture / max(float(texture.std()), 1e-6)
    yn, xn = grid.y[..., None] / np.abs(grid.y).max(), grid.x[..., None] / np.abs(grid.x).max()
    zn = (np.arange(grid.z.size) / max(grid.z.size - 1, 1) - 0.5)[None, None, :]
    a = rng.standard_normal(6)
    field = (
        a[0] * xn
        + a[1] * yn
        + 0.5 * (a[2] * xn * yn + a[3] * (xn**2 - 0.3) + a[4] * (yn**2 - 0.3))
        + a[5] * zn
    )
    return Scanner(texture, np.exp(profile.bias * field))


def render_image(
    cls: np.ndarray, scanner: Scanner, profile: SiteProfile, rng: np.random.Generator
) -> np.ndarray:
    """bSSFP-like intensities: contrast by tissue, texture, PSF blur, bias field, Rician noise."""
    image = np.asarray(profile.contrast)[cls] * scanner.texture
    image = ndimage.gaussian_filter(image, (profile.psf, profile.psf, 0)) * scanner.bias
    noise = profile.noise * rng.standard_normal((2, *image.shape))
    return (np.hypot(image + noise[0], noise[1]) * profile.gain).astype(np.float32)


# ------------------------------------------------------------------------------------ subjects


@dataclass(frozen=True)
class Subject:
    """One phantom subject: manifest values and ED/ES volumes with their label maps."""

    attributes: dict[str, float]  # subject-level values (phase added per row)
    images: tuple[np.ndarray, np.ndarray]  # ED, ES (H x W x slices, float32)
    labels: tuple[np.ndarray, np.ndarray]  # ED, ES (uint8)
    spacing: tuple[float, float, float]  # mm
    shown_slices: tuple[int, int, int]  # basal, mid-ventricular and apical slice (montage)
    long_axis: tuple[float, float, float]  # LV long axis, base to apex (RAS+ unit vector)


def make_subject(profile: SiteProfile, rng: np.random.Generator) -> Subject:
    """Draw attributes, build the calibrated anatomy and render both phases."""
    for _ in range(100):
        clinical = draw_clinical(rng, profile)
        grid, centre, shape = design(clinical, profile, rng)
        try:
            heart = build_heart(clinical, grid, centre, shape)
        except AnatomyError:
            continue
        attributes = {
            "lvedv": clinical.lvedv,
            "lvesv": clinical.lvesv,
            "lvef": clinical.lvef,
            "rvedv": clinical.rvedv,
            "rvesv": clinical.rvesv,
            "rvef": clinical.rvef,
            "lv_mass": lv_mass(clinical),
            "wall_ed": round(heart.ed.wall, 1),
            "wall_es": round(heart.es.wall, 1),
            "age": clinical.age,
            "sex": clinical.sex,
            "bmi": clinical.bmi,
        }
        if all(RANGES[k][0] <= v <= RANGES[k][1] for k, v in attributes.items()):
            break
    else:
        raise FedsynthError(f"{profile.name}: no phantom anatomy fits its attributes")
    body, scanner = draw_body(clinical, profile, rng), draw_scanner(grid, profile, rng)
    images, labels = [], []
    for phase in (heart.ed, heart.es):
        cls, lab = render_classes(grid, body, heart, phase)
        images.append(render_image(cls, scanner, profile, rng))
        labels.append(lab)
    cavity = np.flatnonzero(heart.es.lv_r2 > 0)  # within the ED cavity's slices too
    shown = (int(cavity[0]), int(cavity[(len(cavity) - 1) // 2]), int(cavity[-1]))
    axis = draw_long_axis(rng)  # drawn last: the anatomy's random stream is unchanged
    return Subject(attributes, tuple(images), tuple(labels), grid.spacing, shown, axis)


def draw_long_axis(rng: np.random.Generator) -> tuple[float, float, float]:
    """A LV long axis (RAS+ unit vector, base to apex): `APEX` tilted by up to
    LONG_AXIS_TILT_DEG in a random direction, as hearts and scan planning differ."""
    across = rng.standard_normal(3)
    across -= (across @ APEX) * APEX
    across /= np.linalg.norm(across)
    tilt = math.radians(rng.uniform(0.0, LONG_AXIS_TILT_DEG))
    return tuple(float(c) for c in math.cos(tilt) * APEX + math.sin(tilt) * across)


def subject_rng(seed: int, folder: int, index: int) -> np.random.Generator:
    """The stream of one subject: independent of how many subjects or sites are drawn."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(folder, index)))


def to_nifti(
    array: np.ndarray, spacing: tuple[float, float, float], long_axis: tuple[float, float, float]
) -> nib.Nifti1Image:
    """A NIfTI of an array in the short-axis frame, its stack along `long_axis` (RAS+, base
    to apex), centred on the volume (mm): the reader gives the array back unchanged."""
    affine = short_axis_affine(spacing, array.shape, np.asarray(long_axis))
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    return image


def write_subject(folder: Path, name: str, subject_id: str, subject: Subject) -> list[dict]:
    """Write a subject's four NIfTI files atomically; return its two manifest rows."""
    rows = []
    for phase, tag in enumerate(("ed", "es")):
        row = {"image": f"images/{name}_{tag}.nii.gz", "label": f"labels/{name}_{tag}.nii.gz"}
        for key, array in (("image", subject.images[phase]), ("label", subject.labels[phase])):
            with atomic_path(folder / row[key], mode=PUBLIC_MODE) as tmp:
                nib.save(to_nifti(array, subject.spacing, subject.long_axis), tmp)
        rows.append({**row, "subject": subject_id, **subject.attributes, "phase": phase})
    return rows


def manifest_text(rows: list[dict]) -> str:
    """CSV text with the manifest columns; whole-number attributes written without decimals."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    for row in rows:
        writer.writerow(
            [row[c] if isinstance(row[c], str | int) else f"{row[c]:.1f}" for c in MANIFEST_COLUMNS]
        )
    return buffer.getvalue()


# ------------------------------------------------------------------------------------- cohorts

MONTAGE_SUBJECTS = 2  # per folder
MONTAGE_FOLDERS = 4  # site-1..3 and public


def _make_and_write(
    out: Path, seed: int, job: tuple[int, SiteProfile, int, int]
) -> tuple[list[dict], Subject | None]:
    """One subject drawn and written; the Subject back only when the montage shows it."""
    k, profile, i, _ = job
    subject = make_subject(profile, subject_rng(seed, k, i))
    rows = write_subject(out / profile.name, f"sub-{i:03d}", f"{profile.name}-sub-{i:03d}", subject)
    shown = i <= MONTAGE_SUBJECTS and k < MONTAGE_FOLDERS
    return rows, subject if shown else None


def _workers(jobs: int) -> int:
    """Processes for `jobs` subjects: one per core, none (in process) for a few subjects."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return 1 if jobs < PARALLEL_FROM else max(1, min(cores or 1, MAX_WORKERS))


PARALLEL_FROM = 64  # subjects; below, starting worker processes costs more than it saves
MAX_WORKERS = 8


def generate_cohorts(
    out: Path,
    sites: int,
    subjects: int,
    seed: int,
    public_subjects: int | None = None,
    progress: bool = True,
    profile_seed: int | None = None,
) -> list[Path]:
    """Write out/public and out/site-1..K (NIfTI + manifest.csv) and out/montage.png.

    `seed` draws the subjects; `profile_seed` (default: `seed`) the profiles of sites past
    the three fixed ones, so that another seed with the same profile seed gives new
    subjects of the same sites (held-out subjects of each site's profile). Many subjects
    are drawn in worker processes, one per core; each subject has its own random stream
    (`subject_rng`), so the files do not depend on how many workers drew them.
    Returns the manifest paths, public first. Each folder's manifest is written after its
    volumes, so a manifest never names a file that is not there.
    """
    public_subjects = 2 * subjects if public_subjects is None else public_subjects
    for name, value in (
        ("sites", sites),
        ("subjects", subjects),
        ("public subjects", public_subjects),
    ):
        if not isinstance(value, int) or value < 1:
            raise FedsynthError(f"{name} must be a whole number of at least 1, got {value!r}")
    if not isinstance(seed, int) or seed < 0:
        raise FedsynthError(f"seed must be a whole number of at least 0, got {seed!r}")
    out = Path(out)
    folders = [(0, PUBLIC, public_subjects)]
    profiles = site_profiles(sites, seed if profile_seed is None else profile_seed)
    folders += [(k, p, subjects) for k, p in enumerate(profiles, start=1)]
    jobs = [(k, profile, i, n) for k, profile, n in folders for i in range(1, n + 1)]
    work = functools.partial(_make_and_write, out, seed)
    workers = _workers(len(jobs))
    with contextlib.ExitStack() as stack:
        if workers > 1:
            context = multiprocessing.get_context("spawn")  # no fork of a threaded parent
            pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=context))
            done = pool.map(work, jobs, chunksize=8)
        else:
            done = map(work, jobs)
        rows: list[dict] = []
        shown: dict[str, list[tuple[str, Subject]]] = {}
        manifests = []
        for (_, profile, i, n), (subject_rows, subject) in zip(
            jobs, progress_bar(done, "phantoms", enabled=progress, total=len(jobs)), strict=True
        ):
            rows += subject_rows
            if subject is not None:
                shown.setdefault(profile.name, []).append((f"{profile.name}-sub-{i:03d}", subject))
            if i == n:
                manifests.append(out / profile.name / "manifest.csv")
                atomic_write_text(manifests[-1], manifest_text(rows), PUBLIC_MODE)
                rows = []
    order = sorted(shown, key=lambda name: name == PUBLIC.name)  # sites first, public last
    write_montage(out / "montage.png", [item for name in order for item in shown[name]])
    return manifests


LABEL_COLOURS = np.array(  # background, RV, LV myocardium, LV blood, tissue, lungs
    [
        (0, 0, 0),
        (0.84, 0.15, 0.16),
        (0.17, 0.63, 0.17),
        (1.0, 0.84, 0.0),
        (0.4, 0.4, 0.4),
        (0.12, 0.47, 0.71),
    ]
)


def _tile(rgb: np.ndarray, size: int, gap: int = 3) -> np.ndarray:
    """Centre an RGB slice on a white-framed square, so sites of any matrix line up."""
    out = np.ones((size + 2 * gap, size + 2 * gap, 3))
    top, left = gap + (size - rgb.shape[0]) // 2, gap + (size - rgb.shape[1]) // 2
    out[top : top + size, left : left + size] = 0
    out[top : top + rgb.shape[0], left : left + rgb.shape[1]] = rgb
    return out


def write_montage(path: Path, shown: list[tuple[str, Subject]]) -> None:
    """Basal, mid and apical slices at ED and ES plus the ED labels, one row per subject.

    One mosaic image in one matplotlib axes (fast even for many rows), saved with a
    64-colour palette so that noisy montages stay small.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    columns = ("ED base", "ED mid", "ED apex", "ES base", "ES mid", "ES apex", "labels ED mid")
    size = max(max(s.images[0].shape[:2]) for _, s in shown)
    rows = []
    for _, subject in shown:
        top = float(np.percentile(subject.images[0], 99.5))
        tiles = [
            np.repeat(np.clip(subject.images[p][:, :, k] / top, 0, 1)[..., None], 3, axis=2)
            for p in (0, 1)
            for k in subject.shown_slices
        ]
        tiles.append(LABEL_COLOURS[subject.labels[0][:, :, subject.shown_slices[1]]])
        rows.append(np.concatenate([_tile(t, size) for t in tiles], axis=1))
    mosaic = np.concatenate(rows, axis=0)
    dpi, scale, left, head = 100, 1.2, 1.1, 0.25  # margins in inches
    width, height = mosaic.shape[1] * scale / dpi + left, mosaic.shape[0] * scale / dpi + head
    fig = Figure((width, height), dpi=dpi)
    ax = fig.add_axes((left / width, 0, 1 - left / width, 1 - head / height))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    tile = mosaic.shape[1] / len(columns)
    for i, title in enumerate(columns):
        ax.text((i + 0.5) * tile, -4, title, ha="center", va="bottom", fontsize=8)
    for i, (subject_id, subject) in enumerate(shown):
        a = subject.attributes
        label = f"{subject_id}\nEDV {a['lvedv']:.0f} mL\nESV {a['lvesv']:.0f} mL"
        ax.text(
            -6, (i + 0.5) * mosaic.shape[0] / len(shown), label, ha="right", va="center", fontsize=7
        )
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3])
    with atomic_path(path, mode=PUBLIC_MODE) as tmp:
        rgb.quantize(64).save(tmp, format="PNG", optimize=True)
