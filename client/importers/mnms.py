"""M&Ms (Campello et al. 2021) as distributed: an information CSV (External code,
VendorName, Vendor, Centre, ED, ES as 0-based frame indices, Age, Pathology, Sex as M/F,
Height in cm, Weight in kg) and, anywhere below the source (Training/Labeled, Validation,
Testing), one folder per subject CODE/ with CODE_sa.nii.gz (4D cine) and CODE_sa_gt.nii.gz
(4D; labels 1 LV, 2 myocardium, 3 RV; only the ED and ES frames labelled).
"""

from __future__ import annotations

import functools
from pathlib import Path

from fedsynth.client.importers.cine4d import Cine, phase_pair
from fedsynth.client.importers.labels import MNMS
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

CODE = "External code"
COLUMNS = (CODE, "ED", "ES")
INFO_KEYS = {"Age": "age", "Sex": "sex", "Height": "height", "Weight": "weight"}


def find(source: Path, options: Options) -> Found:
    """Subjects of the information CSV in `source`, matched to their folders below it."""
    table = _information_csv(source)
    _, rows = read_csv(table, COLUMNS)
    folders = {p.parent.name: p.parent for p in source.rglob("*_sa.nii.gz")}
    subjects, listed = [], set()
    for row in rows:
        code = (row.get(CODE) or "").strip()
        if not code:
            continue
        listed.add(code)
        folder = folders.get(code)
        subjects.append(SourceSubject(code, functools.partial(_load, row, folder)))
    for code in sorted(set(folders) - listed):  # skipped, saying why
        subjects.append(SourceSubject(code, functools.partial(_unlisted, table.name)))
    return Found(subjects, frozenset(INFO_KEYS.values()), labelled=True)


def _unlisted(table: str, max_voxels: int) -> Loaded:
    raise VolumeError(f"its folder is not in {table} (no ED/ES frames)")


def _information_csv(source: Path) -> Path:
    """The one CSV in `source` whose header names the External code column."""
    for path in sorted(source.glob("*.csv")):
        try:
            with path.open(encoding="utf-8-sig", errors="replace") as f:
                header = f.readline()
        except OSError:
            continue
        if CODE in header:
            return path
    raise FedsynthError(
        f"--source {source}: no M&Ms information CSV (a .csv with an '{CODE}' column) in it: "
        "not the M&Ms layout"
    )


def _load(row: dict, folder: Path | None, max_voxels: int) -> Loaded:
    code = row[CODE].strip()
    if folder is None:
        raise VolumeError(f"no folder {code}/ with {code}_sa.nii.gz below the source")
    images = Cine(folder / f"{code}_sa.nii.gz", max_voxels)
    labels = Cine(folder / f"{code}_sa_gt.nii.gz", max_voxels)
    ed = frame_number(row.get("ED"), "ED frame index")
    es = frame_number(row.get("ES"), "ES frame index")
    distinct_phases(ed, es, "ED and ES columns, 0-based")
    ed_image, es_image, ed_label, es_label = phase_pair(images, labels, ed, es, MNMS)
    info = {key: (row.get(column) or "").strip() for column, key in INFO_KEYS.items()}
    return Loaded(ed_image, es_image, ed_label, es_label, {k: v for k, v in info.items() if v})
