"""Frames of 4D cine files (M&Ms, UK Biobank, dcm2niix exports), errors naming the file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import nibabel as nib

from fedsynth.client.importers.layout import named, on_image_grid, with_labels
from fedsynth.client.importers.volumes import Volume, iter_frames, open_cine, read_frame
from fedsynth.common.data import VolumeError


class Cine:
    """A checked 4D file (volumes.open_cine) whose frames are read one at a time."""

    def __init__(self, path: Path, max_voxels: int) -> None:
        self.path = path
        self.image, self.notes = _open(path, max_voxels)

    @property
    def frames(self) -> int:
        return int(self.image.shape[3])

    def frame(self, index: int) -> Volume:
        return named(self.path, lambda: read_frame(self.image, index, self.path, self.notes))

    def each_frame(self) -> Iterator[Volume]:
        """Every frame in order, from one pass over the file (volumes.iter_frames)."""
        try:
            yield from iter_frames(self.image, self.path)
        except VolumeError as exc:
            raise VolumeError(f"{self.path.name}: {exc}") from None

    def label(self, index: int, values: dict[int, int], hint: str = "") -> Volume:
        """Frame `index` as a label map in fedsynth's numbering (layout.with_labels)."""
        return named(
            self.path,
            lambda: with_labels(values, read_frame(self.image, index, self.path, self.notes), hint),
        )


def _open(path: Path, max_voxels: int) -> tuple[nib.Nifti1Image, tuple[str, ...]]:
    """volumes.open_cine, its VolumeError prefixed with the file's name."""
    try:
        return open_cine(path, max_voxels)
    except VolumeError as exc:
        raise VolumeError(f"{path.name}: {exc}") from None


def phase_pair(
    images: Cine,
    labels: Cine | None,
    ed: int,
    es: int,
    values: dict[int, int],
    hint: str = "",
) -> tuple[Volume, Volume, Volume | None, Volume | None]:
    """ED and ES frames (0-based indices) of a cine and of its label cine, if any, each
    label map on its image's voxel grid (layout.on_image_grid); `hint` as in with_labels."""
    if labels is not None and labels.frames != images.frames:
        raise VolumeError(
            f"{labels.path.name} has {labels.frames} frames, {images.path.name} {images.frames}"
        )
    out: list[Volume | None] = []
    for index, phase in ((ed, "ED"), (es, "ES")):
        image = images.frame(index)
        label = labels.label(index, values, hint) if labels is not None else None
        if label is not None:
            label = on_image_grid(image, label, phase)
        out += [image, label]
    ed_image, ed_label, es_image, es_label = out
    assert ed_image is not None and es_image is not None
    return ed_image, es_image, ed_label, es_label
