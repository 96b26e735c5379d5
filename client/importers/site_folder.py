"""Writing an imported site folder: private, atomic, and never over someone else's files.

The import is written into a new owner-only folder beside --out and moved into place
only when complete, so an interrupted import leaves --out as it was (a previous import
stays whole). --out must be new, empty, or a previous import (recognised by MARKER and
holding nothing else of ours), which is then replaced. Files are 0600 in 0700 folders
(common/io.py), each written atomically.
"""

from __future__ import annotations

import glob
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
IMPORTING, REPLACED = "importing", "replaced"  # kinds of folder an import keeps beside --out

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
    process's id (as is the previous import while `finish` replaces it).

    Folders of imports into `out` whose process is gone (killed before they finished)
    are dealt with first, as they hold a copy of patient scans: staging folders are
    removed; a previous import set aside by `finish` is moved back to `out` when `out` is
    missing (killed between the two moves: it is the site folder), removed otherwise."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    for kind in (REPLACED, IMPORTING):
        newest_first = sorted(_left_by_dead(out, kind), key=_mtime, reverse=True)
        for stale in newest_first:
            if kind == REPLACED and not out.exists():
                os.replace(stale, out)
                log.info("restored %s, left aside by an import that did not finish", out.name)
                continue
            shutil.rmtree(stale)
            log.info("removed %s, left by an import that did not finish", stale.name)
    return private_dir(_beside(out, IMPORTING))


def _mtime(path: Path) -> float:
    return path.stat().st_mtime


def _beside(out: Path, kind: str) -> Path:
    """A new hidden name beside `out` for a folder of `kind`, naming this process."""
    return out.parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _left_by_dead(out: Path, kind: str) -> list[Path]:
    """The folders of `kind` beside `out` (see _beside) whose process is gone."""
    found = []
    for path in out.parent.glob(f".{glob.escape(out.name)}.{kind}-*"):
        pid = path.name.rsplit("-", 2)[-2]
        if path.is_dir() and pid.isdigit() and not _alive(int(pid)):
            found.append(path)
    return found


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
        old = _beside(out, REPLACED)
        os.replace(out, old)
    os.replace(folder, out)
    if old is not None:
        shutil.rmtree(old)
        log.info("replaced the previous import in %s", out)


def abandon(folder: Path) -> None:
    """Remove an unfinished import's folder."""
    shutil.rmtree(folder, ignore_errors=True)
