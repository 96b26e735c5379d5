"""Reading the volumes an importer needs, never more than data.max-voxels per 3D frame.

3D files go through data.open_nifti/read_nifti (their header, size and gzip-bomb checks).
A 4D cine is checked the same way from its header before any voxel is read: each 3D
frame within data.max-voxels, at most MAX_FRAMES frames, the decompressed stream exactly
as long as the header declares (counted in 1 MiB blocks, never held). Frames are then
read one at a time, so memory stays that of one frame.
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

from fedsynth.common.data import FLOAT32_MAX, NIFTI_SUFFIXES, open_nifti
from fedsynth.common.errors import first_line
from fedsynth.common.nifti_bounds import VolumeError, check_size, check_voxel_offset

MAX_FRAMES = 100  # cardiac phases in one cine; real ones hold 20-50
_READ_ERRORS = (EOFError, zlib.error, OSError, ValueError, ImageFileError, HeaderDataError)


@dataclass(frozen=True)
class Volume:
    """One 3D volume as stored: voxels (X, Y, Z) and the voxel-to-world affine (mm)."""

    data: np.ndarray
    affine: np.ndarray
    zooms: tuple[float, float, float]  # mm, from the header

    @property
    def voxel_ml(self) -> float:
        return math.prod(self.zooms) / 1000


def read_volume(path: Path, max_voxels: int) -> Volume:
    """A 3D NIfTI file's voxels (float32), affine and zooms, checked by data.open_nifti.
    Raises VolumeError with the reason it is unusable."""
    image, _ = open_nifti(path, max_voxels)
    return _frame(image, None, path)


def open_cine(path: Path, max_voxels: int) -> nib.Nifti1Image:
    """A 4D NIfTI (X, Y, Z, frames) checked from its header; no voxel read.

    Raises VolumeError: not a NIfTI file, not 4D, a frame above `max_voxels` voxels,
    more than MAX_FRAMES frames, voxel data far past the header, or a decompressed size
    other than the header's."""
    if not path.is_file():
        raise VolumeError("file not found")
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        raise VolumeError("not a NIfTI file name (expected .nii or .nii.gz)")
    try:
        check_voxel_offset(path)
        image = nib.load(path)
    except _READ_ERRORS as exc:
        raise VolumeError(f"not a readable NIfTI file ({first_line(exc, path)})") from None
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise VolumeError(f"not a NIfTI image ({type(image).__name__})")
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
    return image


def read_frame(image: nib.Nifti1Image, frame: int, path: Path) -> Volume:
    """Frame `frame` (0-based) of a checked 4D cine, with its 3D affine and zooms."""
    frames = image.shape[3]
    if not 0 <= frame < frames:
        raise VolumeError(f"frame index {frame} (0-based) is out of range: it has {frames}")
    return _frame(image, frame, path)


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
                yield _volume(data * proxy.slope + proxy.inter, image)
    except _READ_ERRORS as exc:
        raise VolumeError(f"truncated or corrupt file ({first_line(exc, path)})") from None


def _frame(image: nib.Nifti1Image, frame: int | None, path: Path) -> Volume:
    """Decode one 3D volume of a checked image (frame None: the image is 3D)."""
    try:
        raw = image.dataobj[..., frame] if frame is not None else image.dataobj[...]
        data = np.asarray(raw).reshape(image.shape[:3])
    except _READ_ERRORS as exc:
        raise VolumeError(f"truncated or corrupt file ({first_line(exc, path)})") from None
    return _volume(data, image)


def _volume(data: np.ndarray, image: nib.Nifti1Image) -> Volume:
    """A decoded 3D array of `image` as a Volume; VolumeError for values no image holds."""
    if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise VolumeError(f"voxel type {data.dtype} is not real-valued")
    if not np.all(np.isfinite(data)) or float(np.max(np.abs(data))) > FLOAT32_MAX:
        raise VolumeError("holds NaN, Inf or values beyond 32-bit floats")
    x, y, z = (float(zoom) for zoom in image.header.get_zooms()[:3])
    return Volume(data.astype(np.float32), np.asarray(image.affine, float), (x, y, z))
