"""A site's data: manifest.csv plus NIfTI volumes, checked row by row, read only.

Every reason a row cannot be used becomes a `Rejection` naming the row, the file and why;
nothing here raises in the middle of a pass over a site, and nothing writes into the
site folder. Volumes are read with nibabel (whose errors say what is wrong with a file)
and brought into the short-axis frame (common/orientation.py: slices last, base to apex,
in-plane normalised; permuted and flipped, not interpolated), outliers clipped. Their
geometry is checked (plausibility.py: no stored geometry, a stack too short or too narrow
for a heart or larger than a chest, a sheared stack, a zero-filled missing slice are
refused; blank end slices, a stack that may miss the heart or a heart the scan or the
grid cuts are warned about), then they are
resampled in mm onto the model grid (geometry.py: data.spacing, data.shape voxels,
from the stack's base along the slices, centred in-plane on the heart of the row's label
map where it has one; zero outside the stack),
so a heart has the same size and shape whatever pixel size, matrix and slice thickness
it was stored at, and scaled between intensity percentiles of the stack's own voxels. The
content is checked too (volume_content.py): a label map, a blank volume or values beyond
float32 are refused, outliers and negative values warned about; so is a label column's
(label_maps.py): an image, a binary mask or another numbering of the ventricles is
refused. Attributes are scaled by the config's declared ranges, never by statistics of
the site's data, which would leak; coded and physiologically contradictory ones are
refused (attribute_checks.py). Rows are grouped into subjects, one per person
(subject_identity.py).
"""

from __future__ import annotations

import csv
import math
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath, PureWindowsPath

import nibabel as nib
import numpy as np
import torch
from monai.transforms import ScaleIntensityRange
from nibabel.filebasedimages import ImageFileError
from nibabel.openers import ImageOpener
from nibabel.spatialimages import HeaderDataError

from fedsynth.common.attribute_checks import coding, parse_coded
from fedsynth.common.config import Attribute, DataConfig
from fedsynth.common.errors import FedsynthError, first_line
from fedsynth.common.geometry import Placed, grid_centre, heart_box, model_grid, resample
from fedsynth.common.label_maps import LabelMapError, check_label_map
from fedsynth.common.nifti_bounds import VolumeError, check_size, check_voxel_offset
from fedsynth.common.orientation import OrientationError, short_axis_geometry, to_short_axis
from fedsynth.common.plausibility import (
    GeometryError,
    check_axes,
    check_cover,
    check_extent,
    check_heart,
    check_length,
    check_slices,
)
from fedsynth.common.progress import progress
from fedsynth.common.subject_identity import SubjectUnits
from fedsynth.common.volume_content import ContentError, check_content, clip_outliers

MANIFEST = "manifest.csv"
OPTIONAL_COLUMNS = ("subject", "label")  # of a site manifest, besides image and attributes
NIFTI_SUFFIXES = (".nii", ".nii.gz")
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class Record:
    """A usable manifest row."""

    row: int
    image: Path
    subject: str  # the person's privacy unit: see subject_identity.py
    attributes: Mapping[str, float]
    label: Path | None = None  # the optional `label` column: a label map (public phantoms)
    # the model's input as the check read it (read_images): SiteDataset reads no file twice
    volume: torch.Tensor | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Rejection:
    """A manifest row that cannot be used, and why (row is 1-based, header not counted)."""

    row: int
    file: str
    reason: str


@dataclass(frozen=True)
class RowWarning:
    """What is doubtful about a usable manifest row (row is 1-based, header not counted)."""

    row: int
    file: str
    reason: str


@dataclass
class SiteManifest:
    """The outcome of checking a site folder."""

    root: Path
    records: list[Record] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    warnings: list[RowWarning] = field(default_factory=list)  # of usable rows
    site_warnings: list[str] = field(default_factory=list)  # of the site as a whole

    def subjects(self) -> dict[str, list[Record]]:
        """Usable records grouped by subject, the privacy unit."""
        groups: dict[str, list[Record]] = {}
        for record in self.records:
            groups.setdefault(record.subject, []).append(record)
        return groups

    def to_json(self) -> dict:
        return {
            "data_path": str(self.root),
            "usable": len(self.records),
            "subjects": len(self.subjects()),
            "rejected": [{"row": r.row, "file": r.file, "reason": r.reason} for r in self.rejected],
            "warnings": [{"row": w.row, "file": w.file, "reason": w.reason} for w in self.warnings],
            "site_warnings": self.site_warnings,
        }


def read_nifti(path: Path, max_voxels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D NIfTI volume fully; raise VolumeError with the reason it is unusable.

    Returns the voxels as float32 of shape (X, Y, Z) and the 4x4 voxel-to-world affine
    (mm) that nibabel picks (see `open_nifti`, which `max_voxels` is passed to).
    """
    data, affine, _ = _read(path, max_voxels)
    return data, affine


def _read(path: Path, max_voxels: int | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """`read_nifti`, with the header's notes (`open_nifti`): the file is opened, and a
    .nii.gz decompressed, once for both."""
    image, notes = open_nifti(path, max_voxels)
    try:
        data = np.asanyarray(image.dataobj).reshape(image.shape[:3])
    except (EOFError, zlib.error, OSError, ValueError) as exc:
        raise VolumeError(f"truncated or corrupt file ({first_line(exc, path)})") from None
    if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise VolumeError(f"voxel type {data.dtype} is not real-valued")
    bad = int(np.count_nonzero(~np.isfinite(data)))  # in the stored type: 1e300 is finite
    if bad:
        raise VolumeError(f"contains {bad} NaN/Inf voxels")
    peak = max(abs(float(data.max())), abs(float(data.min())))
    if peak > FLOAT32_MAX:
        raise VolumeError(f"values up to {peak:.3g} do not fit in 32-bit floats")
    data = data.astype(np.float32)
    if float(data.max()) == float(data.min()):
        raise VolumeError(f"constant image (every voxel is {float(data.min()):g})")
    return data, image.affine, notes


def load_header(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """A NIfTI file's image object (no voxel read, any number of dimensions) and its stored
    spatial spacing (3,), mm. Raises VolumeError: no such file, not a NIfTI name, voxel data
    implausibly far past the header (nifti_bounds.check_voxel_offset), unreadable header."""
    if not path.exists():
        raise VolumeError("file not found")
    if not path.is_file():
        raise VolumeError("not a file")
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        raise VolumeError("not a NIfTI file name (expected .nii or .nii.gz)")
    try:
        check_voxel_offset(path)
        image = nib.load(path)
        if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
            raise VolumeError(f"not a NIfTI image ({type(image).__name__})")
        return image, stored_spacing(path, image)
    except (ImageFileError, HeaderDataError) as exc:
        raise VolumeError(f"not a readable NIfTI file ({first_line(exc, path)})") from None
    except (EOFError, zlib.error, OSError, ValueError) as exc:
        raise VolumeError(f"truncated or corrupt file ({first_line(exc, path)})") from None


def open_nifti(path: Path, max_voxels: int | None = None) -> tuple[nib.Nifti1Image, list[str]]:
    """Check a NIfTI file from its header alone, before any voxel is read.

    Returns the image (voxels not loaded; trailing axes of length 1 aside, 3D) and notes
    worth a warning, e.g. that qform and sform disagree. Raises VolumeError naming why the
    file is unusable: not NIfTI, not 3D, too small, fewer bytes than the header claims,
    more than `max_voxels` voxels (config data.max-voxels), invalid spacing, no valid
    orientation. Without `max_voxels`, what is read is still bounded by the file's content.
    """
    image, zooms = load_header(path)
    shape = image.shape
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    dims = "x".join(map(str, shape))
    if len(shape) == 4 and min(shape) >= 1:
        raise VolumeError(_cine_reason(shape, dims))
    if len(shape) != 3:
        raise VolumeError(f"has {len(shape)} dimensions ({dims}); expected a 3D volume")
    if min(shape) < 1:
        raise VolumeError(f"invalid size in the header ({dims})")
    if sorted(shape)[0] == 1 and sorted(shape)[1] >= 2:
        raise VolumeError(
            f"holds a single slice ({dims}), not a short-axis stack: the slices of one stack "
            "must be one 3D volume"
        )
    if min(shape) < 2:
        raise VolumeError(f"too small ({dims}); need 2+ voxels per axis")
    try:
        check_size(path, image, max_voxels)
    except (EOFError, zlib.error, OSError) as exc:
        raise VolumeError(f"truncated or corrupt file ({first_line(exc, path)})") from None
    return image, geometry_notes(image.header, zooms)


def geometry_notes(header: nib.Nifti1Header, zooms: np.ndarray) -> list[str]:
    """The stored geometry of a 3D or 4D NIfTI header (`zooms`: its spatial pixdim as stored,
    `stored_spacing`) checked: raises VolumeError for an invalid spacing, a coded qform/sform
    that gives no orientation, or no geometry at all; returns the doubts worth a warning."""
    if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        raise VolumeError(f"invalid voxel spacing {tuple(zooms.tolist())}")
    note = _orientation_note(header)
    if note == NO_CODES and np.allclose(zooms, 1.0):
        raise VolumeError(
            "no stored geometry (no qform or sform, unit voxel spacing): the size of the "
            "voxels in mm is unknown"
        )
    return [note] if note else []


def _orientation_note(header: nib.Nifti1Header) -> str | None:
    """Refuse a coded qform/sform that gives no orientation; say when the choice is doubtful.

    nibabel's rule (NIfTI-1 standard, method 3 before 2 before 1): a coded sform orients
    the volume, else a coded qform, else the bare voxel grid.
    """
    sform, sform_code = header.get_sform(coded=True)
    try:
        qform, qform_code = header.get_qform(coded=True)
    except ValueError:  # a quaternion that is no rotation
        qform, qform_code = np.full((4, 4), np.nan), int(header["qform_code"])
    if sform_code:
        _check_affine(sform, "sform")
        if qform_code and not np.allclose(qform, sform, rtol=0, atol=1e-3):
            return "qform and sform disagree; the sform is used (as nibabel does)"
        return None
    if qform_code:
        _check_affine(qform, "qform")
        return None
    return NO_CODES


NO_CODES = "no qform or sform code: orientation taken from the voxel grid"
CINE_IMPORT = "`fedsynth import --layout cine` writes one 3D volume per phase (ED and ES)"


def _cine_reason(shape: Sequence[int], dims: str) -> str:
    """Why a 4D file (x, y, slices, frames: a cine as dcm2niix writes it) is no row's image,
    and the way forward."""
    if shape[2] == 1:
        return (
            f"a single-slice cine ({dims}: one slice location, {shape[3]} frames), not a "
            "short-axis stack: the slices of one stack must be one 3D volume per phase"
        )
    return f"has 4 dimensions ({dims}): a cine? a row is one 3D volume; {CINE_IMPORT}"


def _check_affine(affine: np.ndarray, name: str) -> None:
    """A coded qform/sform must be finite and invertible, or no orientation exists."""
    if not np.all(np.isfinite(affine)):
        raise VolumeError(f"{name} is coded but not finite: no valid orientation")
    singular = np.linalg.svd(affine[:3, :3], compute_uv=False)
    if singular[-1] <= 1e-8 * singular[0]:
        raise VolumeError(f"{name} is coded but singular: no valid orientation")


def stored_spacing(path: Path, image: nib.Nifti1Image) -> np.ndarray:
    """The spatial voxel spacing (3,) as the file stores it (nibabel quietly turns a 0 into 1
    on load)."""
    with ImageOpener(path) as f:  # type: ignore[arg-type]  # nibabel opens any PathLike
        header = type(image.header).from_fileobj(f, check=False)
    return np.asarray(header["pixdim"][1:4], dtype=float)


def _root_cause(exc: BaseException, path: Path) -> str:
    """Type and first line of the innermost error (MONAI wraps errors in RuntimeError)."""
    while (inner := exc.__cause__ or exc.__context__) is not None:
        exc = inner
    return f"{type(exc).__name__}: {first_line(exc, path)}"


def read_image(
    path: Path, max_voxels: int | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """`read_nifti`, then the content checks of an MR magnitude image (volume_content.py):
    raises VolumeError naming why the volume is no image; returns the warnings too, the
    header's (`open_nifti`) first."""
    data, affine, notes = _read(path, max_voxels)
    try:
        return data, affine, notes + check_content(data)
    except ContentError as exc:
        raise VolumeError(str(exc)) from None


def read_labels(path: Path, max_voxels: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A label map in the short-axis frame: integer-valued float32 (rows, columns, slices)
    and its affine (its own grid: the image's, or another over the same place). Raises
    VolumeError naming why it is unusable, or is no label map in fedsynth's numbering
    (label_maps.py)."""
    data, affine = read_nifti(path, max_voxels)
    data, affine = _short_axis(data, affine)
    try:
        check_label_map(data)
    except LabelMapError as exc:
        raise VolumeError(str(exc)) from None
    return np.rint(data), affine


def load_volume(path: Path, data_cfg: DataConfig, label: Path | None = None) -> torch.Tensor:
    """A checked volume as a (1, H, W, slices) tensor in [0, 1], slices base to apex,
    placed by the label map `label` where given (see `to_model`)."""
    data, affine, _ = read_image(path)
    labels = read_labels(label, data_cfg.max_voxels) if label is not None else None
    return to_model(data, affine, data_cfg, labels)[0]


def to_model(
    data: np.ndarray,
    affine: np.ndarray,
    data_cfg: DataConfig,
    labels: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """A read volume (X, Y, Z) with its affine as the model's (1, H, W, slices) tensor in
    [0, 1], and warnings about its geometry.

    Voxels far outside its intensity range are clipped first (volume_content.clip_outliers),
    so a few voxels at 1e30 cannot dominate the smoothing and scaling. The volume is then
    permuted/flipped into the short-axis frame (orientation.py), its geometry checked
    (plausibility.py: VolumeError for a stack that cannot be a heart's) and resampled in
    mm onto the model grid (`stack_grid`: data.spacing, data.shape voxels, placed by the
    stack and the heart of `labels` = `read_labels` of the row's label map, on the image's
    grid or another over the same place). Intensities are scaled between the
    percentiles of the stack's own voxels on the grid (not the zero padding around it),
    clipped to [0, 1].
    """
    data = clip_outliers(data)
    data, affine = _short_axis(data, affine)
    try:
        check_extent(affine, data.shape)
        check_axes(affine)
        warnings = check_length(data, affine) + check_slices(data)
        if labels is None:
            slice_fov = data_cfg.shape[2] * data_cfg.spacing[2]
            warnings += check_cover(affine, data.shape, slice_fov)
        grid = stack_grid(affine, data.shape, data_cfg, labels)
    except GeometryError as exc:
        raise VolumeError(str(exc)) from None
    if labels is not None:
        warnings += check_heart(*labels, affine, data.shape, grid, data_cfg.shape)
    placed = resample(data, affine, grid, data_cfg.shape)
    return scale_intensity(placed, data_cfg.intensity_percentiles), warnings


def stack_grid(
    affine: np.ndarray,
    shape: Sequence[int],
    data_cfg: DataConfig,
    labels: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """The model grid's 4x4 affine for a stack in the short-axis frame (`affine`, `shape`),
    placed by geometry.grid_centre on the stack and the heart of `labels` (a label map and
    its own affine) where given. Raises GeometryError for a label map that does not
    overlap the stack in space or whose axes are not the stack's."""
    heart = None
    if labels is not None:
        _check_overlap(labels, shape, affine)
        heart = heart_box(*labels, affine)
    centre = grid_centre(affine, shape, data_cfg.spacing, data_cfg.shape, heart)
    return model_grid(affine, data_cfg.spacing, data_cfg.shape, centre)


def place_labels(
    labels: tuple[np.ndarray, np.ndarray],
    data_cfg: DataConfig,
    stack: tuple[np.ndarray, Sequence[int]] | None = None,
) -> torch.Tensor:
    """A label map (`read_labels`) on the model grid its image is placed on (`to_model`
    with these labels), by partial-volume majority: (1, H, W, slices) long. `stack` is the
    image's short-axis affine and shape (`image_stack`); None: the label map's own grid."""
    data, affine = labels
    stack_affine, shape = stack if stack is not None else (affine, data.shape)
    grid = stack_grid(stack_affine, shape, data_cfg, labels)
    placed = resample(data, affine, grid, data_cfg.shape, labels=True)
    return torch.from_numpy(np.rint(placed.data).astype(np.int64))[None]


def image_stack(path: Path, max_voxels: int | None = None) -> tuple[np.ndarray, tuple[int, ...]]:
    """The short-axis affine and shape of the image at `path`, from its header alone."""
    image, _ = open_nifti(path, max_voxels)
    try:
        return short_axis_geometry(image.affine, image.shape)
    except OrientationError as exc:
        raise VolumeError(str(exc)) from None


def scale_intensity(placed: Placed, percentiles: Sequence[float]) -> torch.Tensor:
    """A placed volume (geometry.resample) scaled to [0, 1] between the `percentiles` of its
    voxels inside the stack (MONAI ScaleIntensityRange, clipped); padding stays 0.
    Returns (1, H, W, slices) float32."""
    values = placed.data[placed.inside]
    low, high = np.percentile(values, percentiles) if values.size else (0.0, 0.0)
    if not high > low:
        return torch.zeros((1, *placed.data.shape), dtype=torch.float32)
    scale = ScaleIntensityRange(
        a_min=float(low), a_max=float(high), b_min=0.0, b_max=1.0, clip=True
    )
    scaled = np.asarray(scale(placed.data), dtype=np.float32)
    scaled[~placed.inside] = 0.0
    return torch.from_numpy(scaled)[None]


def _short_axis(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """orientation.to_short_axis, its refusal as a VolumeError."""
    try:
        return to_short_axis(data, affine)
    except OrientationError as exc:
        raise VolumeError(str(exc)) from None


def _check_overlap(
    labels: tuple[np.ndarray, np.ndarray], shape: Sequence[int], affine: np.ndarray
) -> None:
    """A label map may lie on another grid than its image (cropped around the heart, another
    matrix or voxel order: it is placed by its own affine), but over the same place: its
    axes along the image's (in the short-axis frame, to 0.1 degree) and its voxels
    overlapping the image's in space. Else GeometryError."""
    data, label_affine = labels
    directions = np.asarray(affine, dtype=float)[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    label_directions = label_affine[:3, :3] / np.linalg.norm(label_affine[:3, :3], axis=0)
    if not np.allclose(directions, label_directions, rtol=0, atol=2e-3):
        raise GeometryError(
            "the label map's voxel axes are not its image's (another slice plane): it cannot "
            "be placed on the image"
        )
    to_index = np.linalg.inv(np.asarray(affine, dtype=float)) @ np.asarray(label_affine, float)
    ends = np.array([[-0.5] * 3, np.asarray(data.shape, dtype=float) - 0.5]).T
    corners = np.array(np.meshgrid(*ends, indexing="ij")).reshape(3, -1)
    index = to_index[:3, :3] @ corners + to_index[:3, 3:4]
    size = np.asarray(shape[:3], dtype=float)
    if np.any(index.max(axis=1) <= -0.5) or np.any(index.min(axis=1) >= size - 0.5):
        raise GeometryError(
            "the label map does not overlap its image in space (their affines place them "
            "apart): is it the segmentation of this image?"
        )


def scale_attributes(values: Mapping[str, float], attributes: Sequence[Attribute]) -> np.ndarray:
    """Attributes in config order, mapped to [0, 1] by their declared ranges."""
    return np.array(
        [(values[a.name] - a.min) / (a.max - a.min) for a in attributes], dtype=np.float32
    )


def parse_attribute(text: str | None, attribute: Attribute) -> float:
    """One manifest cell -> a number within the attribute's declared range, or ValueError."""
    if (codes := coding(attribute)) is not None:  # e.g. sex, "0=female,1=male"
        return parse_coded(text, attribute, codes)
    label = f"attribute {attribute.name}"
    if text is None or not text.strip():
        raise ValueError(f"{label} is missing")
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{label} = {text.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{label} = {text.strip()} is not finite")
    if not attribute.min <= value <= attribute.max:
        allowed = f"[{attribute.min:g}, {attribute.max:g}] {attribute.unit}"
        raise ValueError(f"{label} = {value:g} is outside {allowed}")
    if attribute.discrete and value != round(value):
        raise ValueError(f"{label} = {value:g} must be a whole number")
    return value


def read_table(
    path: Path, required: Sequence[str], hint: str = "", optional: Sequence[str] = ()
) -> tuple[list[str], list[dict]]:
    """Header and rows of a CSV file that must have the `required` columns and may have the
    `optional` ones.

    Refuses (FedsynthError) a header that names a column twice, even in another case: which
    copy holds the attribute cannot be known (csv.DictReader would silently keep the last).
    A missing column's error says what is likely wrong (case, `;` or tab separators); an
    optional column spelt in another case ('Subject') is refused naming it, as a required
    one is: read as absent, it would silently change what the rows mean.
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in reader.fieldnames or []]
            reader.fieldnames = header
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise FedsynthError(f"{path}: not a readable CSV file ({first_line(exc)})") from None
    seen: dict[str, str] = {}
    for name in filter(None, header):
        first = seen.setdefault(name.casefold(), name)
        if first == name and header.count(name) > 1:
            raise FedsynthError(f"{path}: column '{name}' appears twice; keep one")
        if first != name:
            raise FedsynthError(f"{path}: columns '{first}' and '{name}' differ only in case")
    missing = [c for c in required if c not in header]
    if missing:
        cause = _likely_cause(header, missing)
        raise FedsynthError(f"{path} lacks required column(s) {', '.join(missing)}{hint}{cause}")
    by_case = {name.casefold(): name for name in header}
    for name in optional:
        if name not in header and (spelt := by_case.get(name.casefold())) is not None:
            raise FedsynthError(
                f"{path}: column '{spelt}' differs only in case from the optional column "
                f"'{name}', which is read only as '{name}': rename it"
            )
    return header, rows


def _likely_cause(header: Sequence[str], missing: Sequence[str]) -> str:
    """Why columns a table has seem missing: another separator, or another case."""
    if len(header) == 1:
        for separator, name in ((";", ";"), ("\t", "tab"), ("|", "|")):
            if separator in header[0]:
                return f"; the file looks {name}-separated: save it with commas"
    by_case = {name.casefold(): name for name in header}
    near = [
        f"column '{by_case[m.casefold()]}' differs only in case from '{m}'"
        for m in missing
        if m.casefold() in by_case
    ]
    return f"; {', '.join(near)}" if near else ""


def _read_manifest(root: Path, data_cfg: DataConfig) -> tuple[list[str], list[dict]]:
    """Header and rows of a site's manifest; a FedsynthError if it is unusable as a whole."""
    manifest = root / MANIFEST
    if not root.is_dir():
        raise FedsynthError(f"data path {root} is not a folder")
    if not manifest.is_file():
        raise FedsynthError(f"no {MANIFEST} in {root}")
    required = ["image", *(a.name for a in data_cfg.attributes)]
    hint = " (needs image and one column per configured attribute)"
    return read_table(manifest, required, hint, OPTIONAL_COLUMNS)


def check_site(
    root: str | Path,
    data_cfg: DataConfig,
    *,
    read_images: bool = True,
    show_progress: bool = True,
    keep_volumes: bool = False,
    strict: bool = False,
) -> SiteManifest:
    """Check every manifest row of a site folder; usable rows become Records.

    A row with warnings (a doubtful orientation or content) is usable and its warnings
    are listed, or with `strict` it is rejected with them as the reason.

    Each Record's subject is its person's privacy unit (subject_identity.py): ids are
    compared normalised, a row naming the file or holding the voxels of an earlier row is a
    duplicate and makes both ids one subject (a site warning names the rows), and rows of
    one subject whose sex, age or BMI disagree are refused or warned about.

    With `read_images`, each volume (and label map) is read fully, checked and placed on
    the model grid (`to_model`), so a usable row is one training will not trip over; with
    `keep_volumes` too, each Record keeps that volume (data.shape floats per row, held in
    memory) so that reading the site again (encoding it once) needs no second read of any file.
    """
    root = Path(root).expanduser().resolve()
    header, rows = _read_manifest(root, data_cfg)
    result = SiteManifest(root=root)
    has_subject = "subject" in header
    if not has_subject:
        result.site_warnings.append(
            "no 'subject' column: each row counts as its own subject; if a person has several "
            "volumes, add the column, or their privacy loss is counted per volume, not per person"
        )
    units = SubjectUnits(data_cfg.attributes, lambda p: read_nifti(p, data_cfg.max_voxels))
    files: dict[int, str] = {}  # the image column of each usable row
    for number, row in enumerate(progress(rows, "site-check", show_progress), start=1):
        file = (row.get("image") or "").strip()
        path = root
        notes: list[str] = []
        subject, identity, image_path = "", None, None
        image: tuple[np.ndarray, np.ndarray] | None = None  # its voxels, read
        linked = False  # its ids are linked by its image (same file or voxels), or unreadable
        try:
            if None in row or any(v is None for v in row.values()):
                raise ValueError(
                    f"has a different number of fields than the header ({len(header)})"
                )
            if not file:
                raise ValueError("no image path")
            subject = (row.get("subject") or "").strip() if has_subject else f"row-{number}"
            if not subject:
                raise ValueError("no subject id")
            values = {a.name: parse_attribute(row.get(a.name), a) for a in data_cfg.attributes}
            identity = units.check_row(number, subject, values)
            notes = identity.notes
            path = image_path = site_path(root, file)
            label = (row.get("label") or "").strip()
            label_path = site_path(root, label, "label") if label else None
            linked = True  # a file named earlier is linked here
            units.check_path(identity, path)
            linked, volume = False, None
            if read_images:
                linked = True  # until it is read: an unreadable image links nothing
                data, affine, content = read_image(path, data_cfg.max_voxels)
                image, linked = (data, affine), False
                labels = None
                if label_path is not None:  # it places the heart: read and checked now
                    try:
                        labels = read_labels(label_path, data_cfg.max_voxels)
                    except VolumeError as exc:
                        raise VolumeError(f"label {label}: {exc}") from None
                linked = True
                units.check_content(identity, data, affine, path)  # one scan, another id?
                checked, geometry = to_model(data, affine, data_cfg, labels)
                notes += content + geometry
                if strict and notes:
                    raise ValueError(f"{'; '.join(notes)} (--strict)")
                volume = checked if keep_volumes else None
        except (ValueError, VolumeError) as exc:
            result.rejected.append(Rejection(row=number, file=file, reason=str(exc)))
            if read_images and subject and not linked:  # its scan still links its ids
                if image_path is None:
                    image_path = _image_path(root, file)
                if image_path is not None:
                    read = _reader(image_path, image, data_cfg.max_voxels)
                    units.link_refused(identity, number, subject, image_path, read)
            continue
        except Exception as exc:  # one odd file must never stop the check of the others
            reason = f"could not be read ({_root_cause(exc, path)})"
            result.rejected.append(Rejection(row=number, file=file, reason=reason))
            continue
        units.accept(identity)
        files[number] = file
        result.records.append(Record(number, path, subject, values, label_path, volume))
        result.warnings += [RowWarning(row=number, file=file, reason=note) for note in notes]
    _merged_people(result, units, files, strict)
    subject_of = units.subjects()  # one person, one subject: ids merged where one person
    result.records = [replace(r, subject=subject_of[r.row]) for r in result.records]
    result.site_warnings += units.warnings
    return result


def _image_path(root: Path, file: str) -> Path | None:
    """`site_path` of a refused row's image, None where it names none."""
    try:
        return site_path(root, file) if file else None
    except ValueError:
        return None


def _reader(
    path: Path, image: tuple[np.ndarray, np.ndarray] | None, max_voxels: int | None
) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    """What reads a refused row's voxels for SubjectUnits.link_refused: those read already,
    or `read_nifti` bounded by `max_voxels` as for any row."""
    return (lambda: image) if image is not None else (lambda: read_nifti(path, max_voxels))


def _merged_people(
    result: SiteManifest, units: SubjectUnits, files: Mapping[int, str], strict: bool
) -> None:
    """The rows of ids found to be one person (SubjectUnits.finish) that disagree with the
    person's first row: refused rows leave `result.records` for `result.rejected`, the
    others are warned about (rejected under `strict`)."""
    refused, warned = units.finish(strict)
    if not refused and not warned:
        return
    result.records = [r for r in result.records if r.row not in refused]
    result.rejected += [Rejection(row, files[row], reason) for row, reason in refused.items()]
    result.rejected.sort(key=lambda r: r.row)
    for row, notes in warned.items():
        result.warnings += [RowWarning(row, files[row], note) for note in notes]
    result.warnings.sort(key=lambda w: w.row)


def site_path(root: Path, text: str, column: str = "image") -> Path:
    """A manifest path -> the file it names, which must lie inside the site folder `root`.

    `root` is already resolved. Refuses (ValueError) an absolute path, a path that climbs
    out with `..`, and one that a symlink (the file or a folder on the way) leads out of:
    training must read only what the site put in its folder. A symlink that stays inside
    is followed. A Windows path (backslashes) that names no file is refused saying so.
    """
    if PurePosixPath(text).is_absolute() or PureWindowsPath(text).is_absolute():
        raise ValueError(f"{column} path is absolute: give it relative to the site folder")
    if os.path.normpath(text.replace("\\", "/")).split("/")[0] == "..":
        raise ValueError(f"{column} path leads out of the site folder (..)")
    path = (root / text).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"{column} path leads out of the site folder through a symlink")
    if "\\" in text and not path.exists():
        raise ValueError(f"{column} file not found: the path uses backslashes (use /)")
    return path


class SiteDataset(torch.utils.data.Dataset):
    """Usable records of a site as (volume, scaled attributes) pairs.

    `subject_rows` groups item indices by subject, so that DP-SGD can sample subjects
    (the privacy unit) rather than rows.
    """

    def __init__(self, manifest: SiteManifest, data_cfg: DataConfig) -> None:
        self.records = manifest.records
        self.attributes = data_cfg.attributes
        self.data_cfg = data_cfg
        index = {id(r): i for i, r in enumerate(self.records)}
        self.subject_rows = [
            [index[id(r)] for r in group] for group in manifest.subjects().values()
        ]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        record = self.records[i]
        volume = record.volume
        try:
            if volume is None:  # a manifest checked without reading images
                volume = load_volume(record.image, self.data_cfg, record.label)
        except VolumeError as exc:  # changed on disk since the check
            raise FedsynthError(f"{record.image} (row {record.row}): {exc}") from None
        return volume, torch.from_numpy(scale_attributes(record.attributes, self.attributes))


def open_site(
    root: str | Path,
    data_cfg: DataConfig,
    *,
    show_progress: bool = True,
    keep_volumes: bool = False,
) -> tuple[SiteDataset, SiteManifest]:
    """Check a site folder and wrap its usable rows; refuse a site with none.

    `keep_volumes`: hold the checked volumes in memory (see `check_site`), for a caller
    that reads every item once right away."""
    manifest = check_site(root, data_cfg, show_progress=show_progress, keep_volumes=keep_volumes)
    if not manifest.records:
        reasons = sorted({r.reason for r in manifest.rejected})
        raise FedsynthError(
            f"no usable rows in {manifest.root / MANIFEST} ({len(manifest.rejected)} rejected; "
            f"e.g. {reasons[0] if reasons else 'empty manifest'})"
        )
    return SiteDataset(manifest, data_cfg), manifest
