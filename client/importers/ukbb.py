"""UK Biobank-style short-axis cines: one folder per subject (named by its id) holding
sa.nii.gz (4D cine) and seg_sa.nii.gz (4D segmentation of every frame; labels 1 LV,
2 myocardium, 3 RV; as Bai et al. 2018's pipeline writes). ED is frame 0, ES the frame
with the least LV blood pool. No attributes: age, sex, height and weight come from
--records.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from fedsynth.client.importers.cine4d import Cine, phase_pair
from fedsynth.client.importers.labels import UKBB
from fedsynth.client.importers.layout import Found, Loaded, Options, SourceSubject
from fedsynth.common.data import VolumeError
from fedsynth.common.errors import FedsynthError

IMAGE, SEGMENTATION = "sa.nii.gz", "seg_sa.nii.gz"
LV = 1  # UK Biobank's LV blood pool value


def find(source: Path, options: Options) -> Found:
    """Each folder of `source` with sa.nii.gz or seg_sa.nii.gz is a subject."""
    folders = sorted(
        d
        for d in source.iterdir()
        if d.is_dir() and ((d / IMAGE).exists() or (d / SEGMENTATION).exists())
    )
    if not folders:
        raise FedsynthError(
            f"--source {source}: no sub-folder with {IMAGE} or {SEGMENTATION}: not the "
            "UK Biobank layout (one folder per subject)"
        )
    subjects = [SourceSubject(d.name, functools.partial(_load, d)) for d in folders]
    return Found(subjects, frozenset(), labelled=True)


def end_systole(segmentation: Cine) -> int:
    """The frame (0-based) with the least LV blood pool, of the frames segmented at all.

    Frames are read in one pass, one at a time. Raises VolumeError when frame 0 (ED) has
    no LV label or no other frame has one."""
    counts = [int(np.count_nonzero(np.rint(f.data) == LV)) for f in segmentation.each_frame()]
    if counts[0] == 0:
        raise VolumeError(f"{SEGMENTATION}: frame 0 (ED) has no LV blood pool label")
    later = [(count, t) for t, count in enumerate(counts) if t > 0 and count > 0]
    if not later:
        raise VolumeError(f"{SEGMENTATION}: no frame besides ED is segmented")
    return min(later)[1]


def _load(folder: Path, max_voxels: int) -> Loaded:
    images = Cine(folder / IMAGE, max_voxels)
    labels = Cine(folder / SEGMENTATION, max_voxels)
    es = end_systole(labels)
    ed_image, es_image, ed_label, es_label = phase_pair(images, labels, 0, es, UKBB)
    return Loaded(ed_image, es_image, ed_label, es_label, {})
