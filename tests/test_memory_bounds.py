"""site-check's memory stays bounded under a 3 GB address-space limit: a NIfTI file is
read no further than its header declares and data.max-voxels allows (gzip bombs, a small
file that inflates to gigabytes, are refused in one line per row), and a legitimate
volume of data.max-voxels is resized without a buffer that grows with the kernel width."""

from __future__ import annotations

import gzip
import json
import resource
import subprocess
import sys

import nibabel as nib
import numpy as np
from sitefiles import GOOD_ATTRIBUTES, blob_volume, save_nifti, write_site

from fedsynth.common.nifti_bounds import MAX_EXTENSION_BYTES

ADDRESS_SPACE = 3 << 30
ZEROS = gzip.compress(bytes(64 << 20), compresslevel=9)  # one gzip member: 64 MiB of zeros


def header_bytes(shape, dtype=np.float32, vox_offset=352, extension=b"\0\0\0\0") -> bytes:
    """A single-file NIfTI-1 header (348 bytes) and its 4-byte extension flag."""
    header = nib.Nifti1Image(np.zeros((2, 2, 2), dtype), np.diag([2.0, 2.0, 8.0, 1.0])).header
    header.set_data_shape(shape)
    header["vox_offset"] = vox_offset
    return header.binaryblock + extension


def bomb(path, head: bytes, gib: int) -> None:
    """`head` then `gib` GiB of zeros, as concatenated gzip members (a multi-member gzip
    stream is one file to gzip readers and to nibabel): a few MB on disk."""
    with path.open("wb") as f:
        f.write(gzip.compress(head))
        for _ in range(gib * 16):
            f.write(ZEROS)


def bomb_site(root):
    """One row per kind of bomb and a good control; returns {image: reason or None}."""
    root.mkdir(parents=True)
    volume = blob_volume().tobytes(order="F")
    # a modest declared shape, then 4 GiB more than it declares
    bomb(root / "trailing.nii.gz", header_bytes((24, 20, 6)) + volume, 4)
    # an enormous declared shape, and gigabytes of zeros to back part of it
    bomb(root / "enormous.nii.gz", header_bytes((4096, 4096, 4096)), 2)
    # an "extension" of 2 GiB before the voxel data: nibabel would read it all into memory
    esize = (2 << 30) - 352  # the data at byte 2^31, which float32 vox_offset holds exactly
    extension = b"\1\0\0\0" + np.array([esize, 0], "<i4").tobytes()
    head = header_bytes((24, 20, 6), np.float32, 352 + esize, extension)
    bomb(root / "extension.nii.gz", head, 2)
    # an uncompressed file with bytes past what its header declares
    (root / "tail.nii").write_bytes(header_bytes((24, 20, 6)) + volume + bytes(4096))
    save_nifti(root / "control.nii.gz", blob_volume(seed=1))
    # a usable image whose label map (read later, for the anatomy meter) is a bomb
    save_nifti(root / "labelled.nii.gz", blob_volume(seed=2))
    bomb(root / "label.nii.gz", header_bytes((24, 20, 6), np.uint8) + bytes(2880), 4)
    expected = {
        "trailing.nii.gz": "decompresses to more than the 11872 bytes its header declares "
        "(352 of header and extensions, 24x20x6 voxels of 4 bytes): not the volume it describes",
        "enormous.nii.gz": "implausible size 4096x4096x4096 (68719476736 voxels, above "
        "data.max-voxels 16777216)",
        "extension.nii.gz": f"implausible header: the voxel data starts at byte {352 + esize}, "
        f"more than {MAX_EXTENSION_BYTES} bytes of extensions past the 348-byte header",
        "tail.nii": "holds more than the 11872 bytes its header declares (352 of header and "
        "extensions, 24x20x6 voxels of 4 bytes): not the volume it describes",
        "control.nii.gz": None,
        "labelled.nii.gz": "label label.nii.gz: decompresses to more than the 3232 bytes its "
        "header declares (352 of header and extensions, 24x20x6 voxels of 1 bytes): not the "
        "volume it describes",
    }
    labels = {"labelled.nii.gz": "label.nii.gz"}
    rows = [
        {"image": name, "label": labels.get(name, ""), "subject": f"s{i}"}
        for i, name in enumerate(expected)
    ]
    write_site(root, rows, ["image", "label", "subject", *GOOD_ATTRIBUTES])
    return expected


def limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def site_check_in_3gb(site) -> dict:
    """site-check --json of the default config, run under the 3 GB address-space limit."""
    command = ["fedsynth.common.cli", "site-check", "--json", "--data-path", site]
    proc = subprocess.run(
        [sys.executable, "-m", *map(str, command)],
        capture_output=True,
        text=True,
        preexec_fn=limit_address_space,
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout)


def test_gzip_bombs_are_refused_in_one_line_under_a_3gb_address_space(tmp_path):
    expected = bomb_site(tmp_path / "site")
    assert sum(p.stat().st_size for p in (tmp_path / "site").iterdir()) < 64 << 20
    report = site_check_in_3gb(tmp_path / "site")
    assert report["usable"] == 1
    assert {r["file"]: r["reason"] for r in report["rejected"]} == {
        name: reason for name, reason in expected.items() if reason is not None
    }


def test_a_volume_of_data_max_voxels_is_resampled_under_a_3gb_address_space(tmp_path):
    """256^3 at 1 mm onto the default grid: MONAI's anti-aliasing convolution unfolded it
    into a 1.8 GB buffer, on top of the rest; the source is now cropped to the grid's field
    of view before it is smoothed."""
    site = tmp_path / "site"
    grid = np.meshgrid(*[np.linspace(-1, 1, 256, dtype=np.float32)] * 3, indexing="ij")
    volume = 1000 * (sum(g**2 for g in grid) < 0.5) + 200 * (grid[0] + grid[1] + grid[2] + 3)
    save_nifti(site / "big.nii.gz", volume.astype(np.uint16), zooms=(1.0, 1.0, 1.0))
    write_site(site, [{"image": "big.nii.gz", "subject": "s"}])
    report = site_check_in_3gb(site)
    assert report["usable"] == 1 and report["rejected"] == [], report
