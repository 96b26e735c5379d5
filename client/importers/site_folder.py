"""Writing an imported site folder: private, atomic, and never over someone else's files.

The import is written into a new owner-only folder beside --out and moved into place
only when complete, so an interrupted import leaves --out as it was (a previous import
stays whole). --out must be new, empty, or a previous import (recognised by MARKER and
holding nothing else of ours), which is then replaced. Files are 0600 in 0700 folders
(common/io.py), each written atomically.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from fedsynth.client.importers.volumes import Volume
from fedsynth.common.data import MANIFEST
from fedsynth.common.errors import FedsynthError
from fedsynth.common.io import PRIVATE_MODE, atomic_path, atomic_write_text, private_dir

MARKER = ".fedsynth-import"  # names the layout; marks a folder this command wrote
OURS = {MARKER, MANIFEST, "images", "labels"}

log = logging.getLogger(__name__)


def check_out(out: Path, source: Path) -> None:
    """Refuse an --out that is not new, empty or a previous import, or that lies inside
    --source (or holds it). Raises FedsynthError saying how to proceed."""
    out, source = out.resolve(), source.resolve()
    if out == source or out.is_relative_to(source) or source.is_relative_to(out):
        raise FedsynthError(f"--out {out} must lie outside --source {source} (and not hold it)")
    if out.exists() and not out.is_dir():
        raise FedsynthError(f"--out {out} is a file: give a new folder")
    if not out.is_dir():
        return
    names = {p.name for p in out.iterdir()}
    if names and (MARKER not in names or names - OURS):
        raise FedsynthError(
            f"--out {out} already holds files and is not a previous import: give a new or "
            "empty folder (a previous import's folder is replaced)"
        )


def staging(out: Path) -> Path:
    """A new owner-only folder beside `out` that the import is written into, named by this
    process's id. The staging folders of imports into `out` whose process is gone (killed
    before they finished) are removed first: they hold a copy of patient scans."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.importing-*"):
        pid = stale.name.rsplit("-", 2)[-2]
        if stale.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale)
            log.info("removed %s, left by an import that did not finish", stale.name)
    name = f".{out.name}.importing-{os.getpid()}-{secrets.token_hex(4)}"
    return private_dir(out.parent / name)


def _alive(pid: int) -> bool:
    """Whether a process `pid` exists (one of another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_volume(path: Path, volume: Volume, dtype: type) -> None:
    """A 3D NIfTI (0600) with the geometry its source file stores (qform, sform, their codes,
    pixdim; volumes.stored_geometry), unchanged: read back, its affine is the volume's, and
    a doubt about the source's orientation (no codes, a qform and sform that disagree) is
    still there for site-check, never recoded as scanner coordinates."""
    image = nib.Nifti1Image(np.asarray(volume.data, dtype=dtype), None)
    header = image.header
    for name, value in volume.geometry.items():
        if name == "pixdim":
            pixdim = np.array(header["pixdim"])
            pixdim[: len(value)] = value
            header["pixdim"] = pixdim
        else:
            header[name] = value
    with atomic_path(path, mode=PRIVATE_MODE) as tmp:
        nib.save(image, tmp)


def finish(folder: Path, out: Path, layout: str, manifest: str) -> None:
    """Write the manifest and marker into `folder`, then move it to `out` (replacing an
    empty folder or a previous import, kept until the move is done)."""
    atomic_write_text(folder / MANIFEST, manifest)
    atomic_write_text(folder / MARKER, f"layout {layout}\n")
    out = out.resolve()
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.replaced-{secrets.token_hex(4)}"
        os.replace(out, old)
    os.replace(folder, out)
    if old is not None:
        shutil.rmtree(old)
        log.info("replaced the previous import in %s", out)


def abandon(folder: Path) -> None:
    """Remove an unfinished import's folder."""
    shutil.rmtree(folder, ignore_errors=True)
