"""Reading a NIfTI file no further than its header declares, before nibabel allocates.

A 300-byte header can claim 32767^3 voxels, 128 KB of gzip can inflate to gigabytes, and
nibabel reads every byte up to the voxel data (the extensions) into memory. These checks
look at the raw header and count the (decompressed) stream in 1 MiB blocks, so memory
stays bounded whatever a file claims or holds. Used for the 3D volumes of a site
(data.open_nifti) and the 4D cines an importer reads (client/importers/volumes.py).
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import nibabel as nib
from nibabel.arrayproxy import ArrayProxy
from nibabel.openers import ImageOpener

from fedsynth.common.errors import FedsynthError


class VolumeError(FedsynthError):
    """A volume that cannot be used; the message is the reason, without the path."""


# DICOM and AFNI header extensions run to kilobytes; nibabel reads the extensions (all bytes
# up to the voxel data) into memory, so a header whose voxel data starts further in is refused
MAX_EXTENSION_BYTES = 16 << 20
# (sizeof_hdr, struct format and byte offset of vox_offset) of NIfTI-1 and NIfTI-2
_HEADER_LAYOUTS = {348: ("f", 108), 540: ("q", 168)}


def check_voxel_offset(path: Path) -> None:
    """Refuse a header whose voxel data starts more than MAX_EXTENSION_BYTES past its end,
    before nibabel reads the extensions (every byte up to the voxel data) into memory.

    A file that is no NIfTI (sizeof_hdr neither 348 nor 540), or that cannot be read at
    all, is left to nibabel to name.
    """
    try:
        with ImageOpener(path) as f:  # type: ignore[arg-type]  # nibabel opens any PathLike
            raw = f.read(544)
    except (EOFError, zlib.error, OSError):
        return
    for order in "<>":
        if len(raw) >= 4 and (size := struct.unpack(order + "i", raw[:4])[0]) in _HEADER_LAYOUTS:
            code, at = _HEADER_LAYOUTS[size]
            if len(raw) < at + struct.calcsize(code):
                return
            offset = struct.unpack_from(order + code, raw, at)[0]
            if math.isfinite(offset) and offset > size + 4 + MAX_EXTENSION_BYTES:
                raise VolumeError(
                    f"implausible header: the voxel data starts at byte {offset:.0f}, more than "
                    f"{MAX_EXTENSION_BYTES} bytes of extensions past the {size}-byte header"
                )
            return


def check_size(path: Path, image: nib.Nifti1Image, max_voxels: int | None) -> None:
    """Refuse a file whose (decompressed) size is not what its header declares (header and
    extensions up to the voxel offset, then dims x bytes per voxel), or that declares more
    voxels than `max_voxels`, before an array of the claimed size is allocated (a 300-byte
    header can claim 32767^3 voxels, and 128 KB of gzip can inflate to gigabytes).

    A .nii.gz is decompressed as a stream, counting bytes in 1 MiB blocks and stopping one
    byte past the declared size (or past max_voxels' worth): memory stays bounded whatever
    the file inflates to. A file that holds more than its header declares is refused too:
    its header does not describe its content."""
    voxels = math.prod(image.shape)
    proxy = image.dataobj
    assert isinstance(proxy, ArrayProxy)  # nib.load of a file path: voxels not read yet
    offset, itemsize = proxy.offset, image.get_data_dtype().itemsize
    claimed = offset + voxels * itemsize
    bound = claimed if max_voxels is None else offset + max_voxels * itemsize + 1
    enough = min(claimed, bound)
    held = _bytes_held(path, enough + 1)
    dims = "x".join(map(str, image.shape))
    if held < enough:
        raise VolumeError(
            f"truncated or corrupt file (the header claims {dims} voxels, {claimed - offset} "
            f"bytes; the file holds {max(held - offset, 0)})"
        )
    if max_voxels is not None and voxels > max_voxels:
        raise VolumeError(
            f"implausible size {dims} ({voxels} voxels, above data.max-voxels {max_voxels})"
        )
    if held > claimed:
        kind = "decompresses to" if compressed(path) else "holds"
        raise VolumeError(
            f"{kind} more than the {claimed} bytes its header declares ({offset} of header "
            f"and extensions, {dims} voxels of {itemsize} bytes): not the volume it describes"
        )


def compressed(path: Path) -> bool:
    return path.name.lower().endswith(".gz")


def _bytes_held(path: Path, limit: int) -> int:
    """How many bytes the (decompressed) file holds, counting no further than `limit`."""
    if not compressed(path):
        return min(path.stat().st_size, limit)
    held = 0
    with ImageOpener(path) as f:  # type: ignore[arg-type]  # nibabel opens any PathLike
        while held < limit and (block := f.read(min(1 << 20, limit - held))):
            held += len(block)
    return held
