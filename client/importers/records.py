"""The site's own records of what a dataset lacks (--records), and the attributes of one
subject assembled from the dataset, the records and the label maps.

--records is a CSV keyed by the dataset's subject id: a `subject` column plus any of age
(years), sex (M/F, or 1 male / 0 female), height (cm), weight (kg), bmi (kg/m2) and any
other configured attribute by its name. Its ids are matched to the dataset's as site-check
compares ids (subject_identity.normalise_id: Unicode form, case and invisible characters
set aside), so a spreadsheet's "Patient001" is ACDC's patient001; two records ids that
normalise alike refuse the file. A value the dataset states and the records give
differently skips the subject: which one is right cannot be known here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from fedsynth.client.importers.measures import bmi
from fedsynth.client.importers.tables import read_csv
from fedsynth.common.data import VolumeError
from fedsynth.common.errors import FedsynthError
from fedsynth.common.subject_identity import how_they_differ, normalise_id

SEX_CODES = {"m": 1, "male": 1, "1": 1, "f": 0, "female": 0, "0": 0}
BODY = {"height": (50.0, 250.0, "cm"), "weight": (20.0, 400.0, "kg")}  # plausible, in units


def read_records(path: Path) -> tuple[frozenset[str], dict[str, dict[str, str]]]:
    """Columns (besides subject) and rows by normalised subject id (normalise_id) of a
    --records CSV.

    Raises FedsynthError naming the file for a missing subject column, a ragged row
    (tables.read_csv), a row without an id, or two rows whose ids normalise alike."""
    header, rows = read_csv(path, ["subject"], " (the dataset's subject id)")
    by_subject: dict[str, dict[str, str]] = {}
    first: dict[str, tuple[int, str]] = {}  # key -> (row, spelling)
    for number, row in enumerate(rows, start=1):
        subject = (row.get("subject") or "").strip()
        key = normalise_id(subject)
        if not key:
            raise FedsynthError(f"{path}: row {number} has no subject id")
        if key in first:
            row_before, before = first[key]
            same = (
                ""
                if before == subject
                else f" (as {before!r}, but for {how_they_differ(before, subject)})"
            )
            raise FedsynthError(
                f"{path}: subject {subject!r} in row {number} is already in row {row_before}"
                f"{same}: keep one row per subject"
            )
        first[key] = (number, subject)
        by_subject[key] = {k: (v or "").strip() for k, v in row.items() if k != "subject"}
    return frozenset(h for h in header if h and h != "subject"), by_subject


def merged(dataset: Mapping[str, str], records: Mapping[str, str] | None) -> dict[str, str]:
    """The dataset's values completed by the records'; VolumeError where they disagree."""
    values = dict(dataset)
    for key, text in (records or {}).items():
        if not text:
            continue
        if key in values and not _same(values[key], text, key):
            raise VolumeError(f"{key} is {values[key]} in the dataset but {text} in --records")
        values.setdefault(key, text)
    return values


def _same(a: str, b: str, key: str) -> bool:
    if key == "sex":
        return SEX_CODES.get(a.lower()) == SEX_CODES.get(b.lower())
    try:
        return math.isclose(float(a), float(b), abs_tol=1e-6)
    except ValueError:
        return a == b


def stated(values: Mapping[str, str], names: Sequence[str]) -> dict[str, float]:
    """Numbers for the attributes `names` from stated text: sex coded 0 female / 1 male,
    bmi from height (cm) and weight (kg) where not given. VolumeError names what is
    missing or malformed."""
    out = {}
    for name in names:
        if name == "bmi" and not values.get("bmi"):
            height, weight = _body(values, "height"), _body(values, "weight")
            out[name] = bmi(height, weight)
        elif not values.get(name):
            raise VolumeError(f"no {name} in the dataset or --records")
        elif name == "sex":
            code = SEX_CODES.get(values[name].lower())
            if code is None:
                raise VolumeError(f"sex {values[name]!r} is not M/F or 1 (male) / 0 (female)")
            out[name] = float(code)
        else:
            out[name] = _number(values[name], name)
    return out


def _body(values: Mapping[str, str], name: str) -> float:
    low, high, unit = BODY[name]
    if not values.get(name):
        raise VolumeError(
            f"no bmi, and no {name} ({unit}) to compute it, in the dataset or --records"
        )
    value = _number(values[name], name)
    if not low <= value <= high:
        raise VolumeError(f"{name} {value:g} is not in {low:g}-{high:g} {unit}")
    return value


def _number(text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError:
        comma = " (a decimal comma? write it with a decimal point)" if "," in text else ""
        raise VolumeError(f"{name} {text!r} is not a number{comma}") from None
    if not math.isfinite(value):
        raise VolumeError(f"{name} {text!r} is not finite")
    return value
