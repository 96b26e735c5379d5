"""What every layout module gives the import: its subjects, each read on demand.

A layout module (acdc, mnms, ukbb, cine) has `find(source, options) -> Found`: it lists
the subjects it sees (raising FedsynthError when `source` is not that layout at all) and
says which values its data holds for every subject. Each subject is read only when it is
imported (`SourceSubject.load`); anything wrong with one subject raises VolumeError,
whose message is the reason it is skipped (the file named, never its voxels).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedsynth.client.importers.labels import to_fedsynth
from fedsynth.client.importers.volumes import Volume, read_volume
from fedsynth.common.data import VolumeError


@dataclass(frozen=True)
class Loaded:
    """One subject as read: ED and ES images, their label maps in fedsynth's convention
    (None when the layout has none) and what the dataset states (raw text: age, sex,
    height in cm, weight in kg, or any configured attribute's name)."""

    ed: Volume
    es: Volume
    ed_label: Volume | None
    es_label: Volume | None
    info: Mapping[str, str]


@dataclass(frozen=True)
class SourceSubject:
    subject: str  # the dataset's own id (patient001, an M&Ms code, a UK Biobank eid)
    load: Callable[[int], Loaded]  # data.max-voxels -> the subject; raises VolumeError


@dataclass(frozen=True)
class Found:
    subjects: list[SourceSubject]
    provides: frozenset[str]  # info keys the layout holds for its subjects
    labelled: bool  # whether label maps come with the images


@dataclass(frozen=True)
class Options:
    """Layout options from the command line."""

    label_values: tuple[int, int, int] | None = None  # cine: LV, myocardium, RV values


def named(path: Path, read: Callable[[], Volume]) -> Volume:
    """`read()`, its VolumeError prefixed with the file's name."""
    try:
        return read()
    except VolumeError as exc:
        raise VolumeError(f"{path.name}: {exc}") from None


def read_named(path: Path, max_voxels: int) -> Volume:
    """A 3D file read by volumes.read_volume; errors name the file."""
    return named(path, lambda: read_volume(path, max_voxels))


def read_label(path: Path, max_voxels: int, values: dict[int, int]) -> Volume:
    """A 3D label map read and converted to fedsynth's convention; errors name the file."""
    return named(path, lambda: with_labels(values, read_volume(path, max_voxels)))


def same_grid(image: Volume, label: Volume, what: str) -> None:
    """Refuse a label map that does not lie on its image's voxel grid."""
    if image.data.shape != label.data.shape or not np.allclose(
        image.affine, label.affine, atol=1e-3
    ):
        raise VolumeError(f"the {what} label map's grid (size or affine) differs from the image's")


def with_labels(values: dict[int, int], label: Volume) -> Volume:
    """A label map converted to fedsynth's convention (labels.to_fedsynth)."""
    return Volume(to_fedsynth(label.data, values), label.affine, label.zooms)


def frame_number(text: str | None, what: str) -> int:
    """A frame number or index cell as an int; VolumeError naming `what` otherwise."""
    try:
        value = float((text or "").strip())
    except ValueError:
        raise VolumeError(f"{what} {text!r} is not a frame number") from None
    if value != int(value):
        raise VolumeError(f"{what} {text!r} is not a whole frame number")
    return int(value)
