"""Reading the volumes an importer needs, never more than data.max-voxels per 3D frame.

3D files go through data.open_nifti/read_nifti (their header, size and gzip-bomb checks).
A 4D cine is checked the same way from its header before any voxel is read: each 3D
frame within data.max-voxels, at most MAX_FRAMES frames, the decompressed stream exactly
as long as the header declares (counted in 1 MiB blocks, never held). Frames are then
read one at a time, so memory stays that of one frame.

A Volume keeps its file's stored geometry (qform, sform, their codes, pixdim) so that the
site folder is written with it unchanged (site_folder.write_volume): site-check then places
an imported volume where it placed the source, and doubts about the source's orientation
(no qform or sform code, a qform and sform that disagree: data.geometry_notes) stay in the
file for site-check to warn about, besides being reported by the import (`Volume.notes`).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.arrayproxy import ArrayProxy
from nibabel.filebasedimages import ImageFileError
from nibabel.openers import ImageOpener
from nibabel.spatialimages import HeaderDataError

from fedsynth.common.data import FLOAT32_MAX, geometry_notes, load_header, open_nifti
from fedsynth.common.errors import first_line
from fedsynth.common.nifti_bounds import VolumeError, check_size

MAX_FRAMES = 100  # cardiac phases in one cine; real ones hold 20-50
_READ_ERRORS = (EOFError, zlib.error, OSError, ValueError, ImageFileError, HeaderDataError)
# the header fields that place the voxels in the world, copied as stored (pixdim: its first 4)
GEOMETRY_FIELDS = (
    "qform_code",
    "sform_code",
    "quatern_b",
    "quatern_c",
    "quatern_d",
    "qoffset_x",
    "qoffset_y",
    "qoffset_z",
    "srow_x",
    "srow_y",
    "srow_z",
    "xyzt_units",
)


@dataclass(frozen=True)
class Volume:
    """One 3D volume as stored: voxels (X, Y, Z), the voxel-to-world affine (mm) nibabel
    takes from the header (sform if coded, else qform if coded, else the bare voxel grid:
    the NIfTI rule, as site-check), the header's geometry fields as stored
    (`stored_geometry`), and doubts about that geometry, each naming the file."""

    data: np.ndarray
    affine: np.ndarray
    geometry: dict[str, np.ndarray]
    notes: tuple[str, ...] = ()

    @property
    def voxel_ml(self) -> float:
        """The volume of one voxel (mL) in the affine in use: |det| of its 3x3, the product
        of geometry.spacing_of for orthogonal axes, whatever pixdim says (a converter may
        store the slice thickness there, not the spacing between slices)."""
        return abs(float(np.linalg.det(self.affine[:3, :3]))) / 1000


def stored_geometry(header: nib.Nifti1Header) -> dict[str, np.ndarray]:
    """Copies of a NIfTI header's GEOMETRY_FIELDS and pixdim[:4] (qfac and the spacing)."""
    fields = {name: np.array(header[name]) for name in GEOMETRY_FIELDS}
    fields["pixdim"] = np.array(header["pixdim"][:4])
    return fields


def read_volume(path: Path, max_voxels: int) -> Volume:
    """A 3D NIfTI file's voxels (float32), affine and stored geometry, checked by
    data.open_nifti (whose notes it keeps). Raises VolumeError with the reason it is
    unusable."""
    image, notes = open_nifti(path, max_voxels)
    return _frame(image, None, path, _named(path, notes))


def open_cine(path: Path, max_voxels: int) -> tuple[nib.Nifti1Image, tuple[str, ...]]:
    """A 4D NIfTI (X, Y, Z, frames) checked from its header; no voxel read. Returns it and
    the doubts about its geometry (data.geometry_notes), each naming the file.

    Raises VolumeError: not a NIfTI file, not 4D, a frame above `max_voxels` voxels,
    more than MAX_FRAMES frames, voxel data far past the header, a decompressed size
    other than the header's, or a stored geometry site-check refuses."""
    image, zooms = load_header(path)
    shape = tuple(image.shape)
    dims = "x".join(map(str, shape))
    if len(shape) != 4 or min(shape) < 1 or min(shape[:3]) < 2:
        raise VolumeError(f"is {dims}; expected a 4D cine (x, y, slices, frames)")
    if math.prod(shape[:3]) > max_voxels:
        raise VolumeError(f"a frame of {dims} has more voxels than data.max-voxels {max_voxels}")
    if shape[3] > MAX_FRAMES:
        raise VolumeError(f"{shape[3]} frames, more than {MAX_FRAMES}")
    try:  # bounded by the checks above: frames x data.max-voxels
        check_size(path, image, None)
    except _READ_ERRORS as exc:
        raise VolumeError(f"truncated or corrupt file ({first_line(exc, path)})") from None
    return image, _named(path, geometry_notes(image.header, zooms))


def read_frame(
    image: nib.Nifti1Image, frame: int, path: Path, notes: tuple[str, ...] = ()
) -> Volume:
    """Frame `frame` (0-based) of a checked 4D cine, with its 3D affine, stored geometry
    and the file's `notes`."""
    frames = image.shape[3]
    if not 0 <= frame < frames:
        raise VolumeError(f"frame index {frame} (0-based) is out of range: it has {frames}")
    return _frame(image, frame, path, notes)


def iter_frames(image: nib.Nifti1Image, path: Path) -> Iterator[Volume]:
    """Every frame of a checked 4D cine, in order, from one pass over the file.

    A .nii.gz stream cannot seek: reading frame t alone decompresses every frame before
    it, so a search over all frames (UK Biobank's ES) reads them in sequence instead,
    one frame in memory at a time (NIfTI stores voxels in Fortran order, scaled by the
    header's slope and intercept)."""
    proxy = image.dataobj
    assert isinstance(proxy, ArrayProxy)
    shape, dtype = image.shape[:3], image.get_data_dtype()
    size = math.prod(shape) * dtype.itemsize
    try:
        with ImageOpener(path) as f:  # type: ignore[arg-type]
            f.seek(proxy.offset)
            for _ in range(image.shape[3]):
                raw = f.read(size)
                if len(raw) < size:
                    raise VolumeError("truncated or corrupt file (ends inside a frame)")
                data = np.frombuffer(raw, dtype).reshape(shape, order="F")
                yield _volume(data * proxy.slope + proxy.inter, image, ())
    except _READ_ERRORS as exc:
        raise VolumeError(f"truncated or corrupt file ({first_line(exc, path)})") from None


def _named(path: Path, notes: list[str]) -> tuple[str, ...]:
    return tuple(f"{path.name}: {note}" for note in notes)


def _frame(image: nib.Nifti1Image, frame: int | None, path: Path, notes: tuple[str, ...]) -> Volume:
    """Decode one 3D volume of a checked image (frame None: the image is 3D)."""
    try:
        raw = image.dataobj[..., frame] if frame is not None else image.dataobj[...]
        data = np.asarray(raw).reshape(image.shape[:3])
    except _READ_ERRORS as exc:
        raise VolumeError(f"truncated or corrupt file ({first_line(exc, path)})") from None
    return _volume(data, image, notes)


def _volume(data: np.ndarray, image: nib.Nifti1Image, notes: tuple[str, ...]) -> Volume:
    """A decoded 3D array of `image` as a Volume; VolumeError for values no image holds."""
    if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise VolumeError(f"voxel type {data.dtype} is not real-valued")
    if not np.all(np.isfinite(data)) or float(np.max(np.abs(data))) > FLOAT32_MAX:
        raise VolumeError("holds NaN, Inf or values beyond 32-bit floats")
    affine = np.asarray(image.affine, float)
    return Volume(data.astype(np.float32), affine, stored_geometry(image.header), notes)
