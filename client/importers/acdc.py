"""ACDC (Bernard et al. 2018) as distributed: patientNNN/ folders (under training/ and
testing/, or directly under the source) each with Info.cfg ("ED: 1", "ES: 12",
"Height: 184.0" cm, "Weight: 95.0" kg, "NbFrame: 30"; ED/ES are 1-based frame numbers),
patientNNN_frameNN.nii.gz and its segmentation patientNNN_frameNN_gt.nii.gz (3D; labels
1 RV, 2 myocardium, 3 LV). ACDC states no age or sex: those come from --records.
"""

from __future__ import annotations

import functools
from pathlib import Path

from fedsynth.client.importers.labels import ACDC
from fedsynth.client.importers.layout import (
    Found,
    Loaded,
    Options,
    SourceSubject,
    distinct_phases,
    frame_number,
    on_image_grid,
    read_label,
    read_named,
)
from fedsynth.common.data import VolumeError
from fedsynth.common.errors import FedsynthError

INFO = "Info.cfg"
PHASES = ("ED", "ES")


def find(source: Path, options: Options) -> Found:
    """The patient folders under `source` (or its training/ and testing/)."""
    configs = sorted(source.glob(f"patient*/{INFO}")) + sorted(source.glob(f"*/patient*/{INFO}"))
    if not configs:
        raise FedsynthError(
            f"--source {source}: no patientNNN/{INFO} in it or its sub-folders (training/, "
            "testing/): not the ACDC layout"
        )
    subjects = [SourceSubject(c.parent.name, functools.partial(_load, c.parent)) for c in configs]
    return Found(subjects, frozenset({"height", "weight"}), labelled=True)


def read_info(path: Path) -> dict[str, str]:
    """Info.cfg's "Key: value" lines, keys lower-cased."""
    try:
        # utf-8-sig: a file saved by Windows Notepad starts with a byte-order mark
        lines = path.read_text(encoding="utf-8-sig", errors="replace").splitlines()
    except OSError as exc:
        raise VolumeError(f"{path.name} cannot be read ({exc.strerror})") from None
    info = {}
    for line in lines:
        key, colon, value = line.partition(":")
        if colon:
            info[key.strip().lower()] = value.strip()
    return info


def _load(folder: Path, max_voxels: int) -> Loaded:
    info = read_info(folder / INFO)
    frames = frame_number(info.get("nbframe"), f"{INFO} NbFrame")
    numbers = {phase: frame_number(info.get(phase.lower()), f"{INFO} {phase}") for phase in PHASES}
    for phase, number in numbers.items():
        if not 1 <= number <= frames:
            raise VolumeError(
                f"{INFO} {phase} frame {number} is out of range 1-{frames} (1-based, NbFrame)"
            )
    distinct_phases(numbers["ED"], numbers["ES"], f"{INFO}, 1-based")
    volumes = []
    for phase, number in numbers.items():
        stem = folder / f"{folder.name}_frame{number:02d}"
        image = read_named(stem.with_name(stem.name + ".nii.gz"), max_voxels)
        gt = stem.with_name(stem.name + "_gt.nii.gz")
        label = on_image_grid(image, read_label(gt, max_voxels, ACDC), phase)
        volumes += [image, label]
    ed, ed_label, es, es_label = volumes
    keep = {k: info[k] for k in ("height", "weight") if info.get(k)}
    return Loaded(ed, es, ed_label, es_label, keep)
