"""Atomic, durable file writes with explicit permissions.

A crash leaves either the old file or the new one, never half of one, and a write returns
only once the data (and, for a new name, the directory entry) is on disk.

Permissions are private by default: a file is created 0600 and a folder 0700, so a writer
that forgets to choose can leak nothing (a site's latents decode to its volumes with the
public autoencoder; its ledger names its rounds). Writers of artefacts meant to be shared
(checkpoints, synthetic cohorts, phantoms) pass `mode=PUBLIC_MODE` (0644). Either mode is only
ever narrowed by the process umask, as open(2) does; nothing here reads or changes the
umask (changing it is process-wide, a race with every other thread).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from fedsynth.common.errors import FedsynthError

PRIVATE_MODE = 0o600  # owner only: everything in a site's state dir, the default
PUBLIC_MODE = 0o644  # readable by all: artefacts meant to be shared

log = logging.getLogger(__name__)


def folder_mode(mode: int) -> int:
    """The folder mode that goes with a file mode: search wherever reading is allowed."""
    return mode | (mode & 0o444) >> 2


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, suffix: str | None = None, mode: int = PRIVATE_MODE
) -> Iterator[Path]:
    """Yield a new temporary path beside `path`; on success fsync it and rename it over `path`.

    The temporary file is created (exclusively) with `mode`, narrowed by the umask, so the
    file never exists with wider permissions; missing parent folders are created with
    `folder_mode(mode)`. `suffix` defaults to the target's own suffixes so that writers
    which pick a format by file name (nibabel's `.nii.gz`, matplotlib's `.png`) still see
    the right extension. Raises OSError when the folder cannot be written.
    """
    path = Path(path)
    path.parent.mkdir(mode=folder_mode(mode), parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp{suffix}"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(
    path: str | os.PathLike, write: Callable[[Path], object], mode: int = PRIVATE_MODE
) -> None:
    """Call `write(tmp_path)` and move the result into place atomically (see atomic_path)."""
    with atomic_path(path, mode=mode) as tmp:
        write(tmp)


def atomic_write_text(path: str | os.PathLike, text: str, mode: int = PRIVATE_MODE) -> None:
    """Write text atomically (UTF-8), created with `mode` (see atomic_path)."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), mode)


def private_dir(path: str | os.PathLike) -> Path:
    """Create folder `path` owner-only (0700), or tighten it to that if others can enter it.

    For folders that are fedsynth's alone (a site's state dir). Tightening an existing
    folder is logged; where it is not allowed (another owner) a warning says so and the
    files keep their own owner-only modes.
    """
    path = Path(path).expanduser()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    current = stat.S_IMODE(path.stat().st_mode)
    if current & 0o077:
        try:
            os.chmod(path, current & 0o700)
        except OSError as exc:
            log.warning(
                "%s is open to other users (mode %o) and cannot be tightened: %s",
                path,
                current,
                exc.strerror,
            )
        else:
            log.warning(
                "%s was open to other users (mode %o): now %o", path, current, current & 0o700
            )
    return path


def fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json_object(path: Path, remedy: str) -> dict:
    """The JSON object in `path`. Raises FedsynthError naming the file (missing, unreadable,
    not JSON, not an object), followed by `remedy` (what the reader can do about it)."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise FedsynthError(f"{path} is missing: {remedy}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise FedsynthError(f"{path} is damaged (not readable JSON): {remedy}") from None
    if not isinstance(value, dict):
        raise FedsynthError(f"{path} is damaged (not a JSON object): {remedy}")
    return value


def published_path(path: str | os.PathLike, base: str | os.PathLike, stand_in: str) -> str:
    """How a published file (sampling.json, report.html) names `path`: relative to the
    folder `base` when it lies inside it or is its sibling, else `stand_in` then its own
    name: never the publisher's home or folder layout."""
    target, home = Path(path).expanduser().resolve(), Path(base).expanduser().resolve()
    if target.is_relative_to(home) or target.parent == home.parent:
        return os.path.relpath(target, home)
    return f"{stand_in}/{target.name}"
