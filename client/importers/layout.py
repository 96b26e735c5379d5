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
from nibabel.orientations import apply_orientation, inv_ornt_aff

from fedsynth.client.importers.labels import check_numbering, to_fedsynth
from fedsynth.client.importers.volumes import Volume, read_volume
from fedsynth.common.data import NO_CODES, VolumeError

GRID_MM = 1e-2  # voxel centres this close (mm) are the same place (as site-check's _same_grid)


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


def on_image_grid(image: Volume, label: Volume, what: str) -> Volume:
    """The label map on its image's voxel grid, with the image's affine and stored geometry.

    A label map is compared with its image by the physical places of its voxel centres, not
    by raw affines: one stored in another voxel order (axes permuted or reversed, as a
    contouring tool may write it, the affine to match) is permuted and flipped onto the
    image's array order, never interpolated. Raises VolumeError (naming `what`, the phase)
    when its voxel centres are not the image's within GRID_MM (another size, spacing,
    position or angle)."""
    to_image = np.linalg.inv(image.affine) @ label.affine  # label index -> image index
    axes = np.argmax(np.abs(to_image[:3, :3]), axis=0)  # image axis of each label axis
    if sorted(axes.tolist()) == [0, 1, 2]:
        signs = np.sign(to_image[axes, range(3)])
        ornt = np.column_stack([axes, signs]).astype(float)
        data = np.ascontiguousarray(apply_orientation(label.data, ornt))
        moved = label.affine @ inv_ornt_aff(ornt, label.data.shape)
        same = np.allclose(moved, image.affine, rtol=0, atol=GRID_MM)
        if data.shape == image.data.shape and same:
            return Volume(data, image.affine, image.geometry, label.notes)
    unplaced = [
        f"the {kind}" for kind, v in (("image", image), ("label map", label)) if _no_codes(v)
    ]
    verb = "have" if len(unplaced) > 1 else "has"
    why = f": {' and '.join(unplaced)} {verb} no qform or sform code" if unplaced else ""
    raise VolumeError(
        f"the {what} label map's voxels are not its image's (size, spacing, position or angle "
        f"differ, not only the voxel order){why}"
    )


def _no_codes(volume: Volume) -> bool:
    """Whether the volume's file gives no orientation (data.NO_CODES among its notes)."""
    return any(note.endswith(NO_CODES) for note in volume.notes)


def with_labels(values: dict[int, int], label: Volume, hint: str = "") -> Volume:
    """A label map converted to fedsynth's convention (labels.to_fedsynth), once its
    numbering is checked against its anatomy (labels.check_numbering, `hint` added to its
    refusal: how the user gives another numbering)."""
    check_numbering(label.data, label.affine, values, hint)
    return Volume(to_fedsynth(label.data, values), label.affine, label.geometry, label.notes)


def frame_number(text: str | None, what: str) -> int:
    """A frame number or index cell as an int; VolumeError naming `what` otherwise."""
    try:
        value = float((text or "").strip())
    except ValueError:
        raise VolumeError(f"{what} {text!r} is not a frame number") from None
    if value != int(value):
        raise VolumeError(f"{what} {text!r} is not a whole frame number")
    return int(value)


def distinct_phases(ed: int, es: int, numbering: str) -> None:
    """Refuse ED and ES given as one frame (`numbering` says how the numbers count): the two
    rows would hold the same voxels, which site-check refuses as a duplicate."""
    if ed == es:
        raise VolumeError(f"ED and ES are the same frame {ed} ({numbering})")
