"""Any 4D short-axis cine NIfTI (e.g. dcm2niix's output of a DICOM cine series), listed
in a CSV: --source is that CSV, or a folder holding it as cine.csv. Paths in it are
relative to the CSV's folder (or absolute).

Columns: subject; file (the 4D cine); the ED and ES frames as either ed_frame0, es_frame0
(0-based: the first frame is 0) or ed_frame1, es_frame1 (1-based: the first frame is 1,
as scanners number phases); optionally label (a 4D segmentation of the same frames, its
values given by --label-values, fedsynth's 3,2,1 by default); any attribute columns
(age, sex as M/F or 1/0, height in cm, weight in kg, bmi, and without label maps the
volumes lvedv, ...). What the CSV lacks can come from --records.
"""

from __future__ import annotations

import functools
from pathlib import Path

from fedsynth.client.importers.cine4d import Cine, phase_pair
from fedsynth.client.importers.labels import convention
from fedsynth.client.importers.layout import (
    Found,
    Loaded,
    Options,
    SourceSubject,
    distinct_phases,
    frame_number,
)
from fedsynth.client.importers.tables import read_csv
from fedsynth.common.data import VolumeError
from fedsynth.common.errors import FedsynthError

LISTING = "cine.csv"
BASES = {0: ("ed_frame0", "es_frame0"), 1: ("ed_frame1", "es_frame1")}
OWN_COLUMNS = {"subject", "file", "label", *BASES[0], *BASES[1]}
# labels.check_numbering's advice where the label files are numbered otherwise
HINT = "if so, give --label-values {lv},{myocardium},{rv}"


def find(source: Path, options: Options) -> Found:
    """The rows of the cine CSV."""
    listing = source / LISTING if source.is_dir() else source
    if not listing.is_file():
        raise FedsynthError(f"--source {source}: no {LISTING} (the cine layout lists its files)")
    header, rows = read_csv(listing, ["subject", "file"])
    bases = [base for base, columns in BASES.items() if set(columns) <= set(header)]
    if len(bases) != 1:
        raise FedsynthError(
            f"{listing}: give the ED and ES frames in exactly one pair of columns: "
            "ed_frame0, es_frame0 (0-based) or ed_frame1, es_frame1 (1-based)"
        )
    base = bases[0]
    labelled = "label" in header
    lv, myocardium, rv = options.label_values or (3, 2, 1)
    values = convention(lv=lv, myocardium=myocardium, rv=rv)
    subjects = [
        SourceSubject(
            (row.get("subject") or "").strip(),
            functools.partial(_load, row, listing.parent, base, values),
        )
        for row in rows
    ]
    provides = frozenset(h for h in header if h and h not in OWN_COLUMNS)
    return Found(subjects, provides, labelled)


def _load(row: dict, folder: Path, base: int, values: dict[int, int], max_voxels: int) -> Loaded:
    file = (row.get("file") or "").strip()
    if not file:
        raise VolumeError("no file in its row")
    images = Cine(folder / file, max_voxels)
    label = (row.get("label") or "").strip()
    labels = Cine(folder / label, max_voxels) if label else None
    ed_column, es_column = BASES[base]
    ed, es = (frame_number(row.get(c), c) for c in (ed_column, es_column))
    for column, number in ((ed_column, ed), (es_column, es)):
        if not base <= number < images.frames + base:
            last = images.frames - 1 + base
            raise VolumeError(f"{column} {number} is out of range {base}-{last} ({file})")
    distinct_phases(ed, es, f"{ed_column} and {es_column}, {base}-based")
    ed, es = ed - base, es - base
    ed_image, es_image, ed_label, es_label = phase_pair(images, labels, ed, es, values, HINT)
    info = {k: v.strip() for k, v in row.items() if k not in OWN_COLUMNS and v and v.strip()}
    return Loaded(ed_image, es_image, ed_label, es_label, info)
