"""`import_site`: a layout's subjects read, measured, checked and written as a site folder.

A subject that cannot be imported (a missing or corrupt file, a frame out of range, no
ED label, an attribute outside the config's declared range) is skipped with its reason;
the others are imported. What the config needs and the layout cannot give for any
subject (ACDC's age and sex without --records) refuses the whole import up front.

Subject ids are compared as site-check compares them (subject_identity.normalise_id):
a dataset id that normalises like an earlier one is skipped, and --records rows are
found by the normalised id. Doubts about a file's geometry that site-check would warn
about (no orientation codes, qform and sform that disagree) are reported per subject
(`Outcome.warnings`); the files are written with their source's stored geometry, so
site-check of the site folder warns about them too.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedsynth.client.importers import acdc, cine, mnms, site_folder, ukbb
from fedsynth.client.importers.layout import Found, Loaded, Options
from fedsynth.client.importers.measures import MEASURED, from_labels
from fedsynth.client.importers.records import merged, read_records, stated
from fedsynth.common.config import DataConfig
from fedsynth.common.data import VolumeError, parse_attribute
from fedsynth.common.errors import FedsynthError
from fedsynth.common.subject_identity import how_they_differ, normalise_id

LAYOUTS = {"acdc": acdc.find, "mnms": mnms.find, "ukbb": ukbb.find, "cine": cine.find}
PHASE = "phase"  # 0 ED, 1 ES: set per row, not read

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    out: Path
    imported: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (subject, reason)
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (subject, note) of imported
    unmatched: list[str] = field(default_factory=list)  # --records ids of no source subject


def import_site(
    layout: str,
    source: Path,
    out: Path,
    data_cfg: DataConfig,
    records_path: Path | None = None,
    options: Options | None = None,
) -> Outcome:
    """Import `source` (in `layout`) into the site folder `out`; see the module docstring.

    Writes nothing when no subject could be imported (`Outcome.imported` is empty).
    Raises FedsynthError for an import refused as a whole."""
    source, out = Path(source).expanduser(), Path(out).expanduser()
    if not source.exists():
        raise FedsynthError(f"--source {source} does not exist")
    site_folder.check_out(out, source)
    try:
        found = LAYOUTS[layout](source, options or Options())
    except OSError as exc:
        raise FedsynthError(f"--source {source} cannot be read ({exc.strerror})") from None
    columns, records = read_records(records_path) if records_path else (frozenset(), {})
    names = [a.name for a in data_cfg.attributes]
    _require(layout, found, columns, names)
    outcome = Outcome(out)
    in_source = {normalise_id(s.subject) for s in found.subjects}
    outcome.unmatched = sorted(key for key in records if key not in in_source)
    try:
        folder = site_folder.staging(out)
        try:
            rows = _import_all(found, records if records_path else None, data_cfg, folder, outcome)
            if rows:
                site_folder.finish(folder, out, layout, manifest_text(rows, names))
        finally:
            site_folder.abandon(folder)  # gone already when finished
    except OSError as exc:
        raise FedsynthError(f"--out {out} cannot be written ({exc.strerror})") from None
    return outcome


def _require(layout: str, found: Found, columns: frozenset[str], names: list[str]) -> None:
    """Refuse an import that cannot give a configured attribute for any subject."""
    have = found.provides | columns
    if found.labelled:
        have |= set(MEASURED)
    if {"height", "weight"} <= have:
        have |= {"bmi"}
    missing = [n for n in names if n != PHASE and n not in have]
    if missing:
        raise FedsynthError(
            f"the config's attribute(s) {', '.join(missing)} are not in the {layout} data: "
            f"give them in --records CSV (columns subject, {', '.join(missing)}"
            f"{'; or height in cm and weight in kg' if 'bmi' in missing else ''})"
        )


def _import_all(
    found: Found,
    records: dict[str, dict[str, str]] | None,
    data_cfg: DataConfig,
    folder: Path,
    outcome: Outcome,
) -> list[dict[str, str]]:
    """Each subject imported or skipped; the manifest rows of those imported."""
    rows: list[dict[str, str]] = []
    names = [a.name for a in data_cfg.attributes if a.name != PHASE]
    used: dict[str, str] = {}  # normalised id -> the first spelling
    stems: set[str] = set()
    for source_subject in found.subjects:
        subject = source_subject.subject
        key = normalise_id(subject)
        try:
            if not key:
                raise VolumeError("no subject id")
            if key in used:
                raise VolumeError(_twice(used[key], subject))
            used[key] = subject
            loaded = source_subject.load(data_cfg.max_voxels)
            values = _attributes(loaded, records.get(key) if records else None, names)
            texts = _checked(values, data_cfg)
            rows += _write(folder, subject, file_stem(subject, stems), loaded, texts)
        except Exception as exc:  # one subject's odd file must never stop the others
            outcome.skipped.append((subject or "(no id)", _reason(exc)))
            continue
        outcome.imported.append(subject)
        outcome.warnings += [(subject, note) for note in _notes(loaded)]
        log.info("imported %s", subject)
    return rows


def _twice(first: str, subject: str) -> str:
    """Why a dataset id that normalises like an earlier one is skipped."""
    if first == subject:
        return "its id appears twice in the source"
    how = how_they_differ(first, subject)
    return f"its id is {first!r}'s but for {how}: one subject id to site-check"


def _notes(loaded: Loaded) -> list[str]:
    """A subject's doubts about its files' geometry, each once (a 4D file gives both phases)."""
    volumes = (loaded.ed, loaded.es, loaded.ed_label, loaded.es_label)
    return list(dict.fromkeys(n for v in volumes if v is not None for n in v.notes))


def _attributes(loaded: Loaded, record: dict[str, str] | None, names: list[str]) -> dict:
    """The configured attributes (but phase) of a subject, measured where labels exist."""
    values = merged(loaded.info, record)
    measured = {}
    if loaded.ed_label is not None and loaded.es_label is not None:
        measured = from_labels(loaded.ed_label, loaded.es_label)
    return {**stated(values, [n for n in names if n not in measured]), **measured}


def _checked(values: dict[str, float], data_cfg: DataConfig) -> dict[str, str]:
    """Values as manifest text (0.1 precision; whole numbers for discrete attributes),
    each within the config's declared range (data.parse_attribute's message if not)."""
    texts = {}
    for attribute in data_cfg.attributes:
        if attribute.name == PHASE:
            continue
        value = values[attribute.name]
        text = f"{round(value):d}" if attribute.discrete else f"{value:.1f}"
        parse_attribute(text, attribute)
        texts[attribute.name] = text
    return texts


def _write(
    folder: Path, subject: str, name: str, loaded: Loaded, texts: dict[str, str]
) -> list[dict[str, str]]:
    """The subject's images and label maps (uint8) as files named after `name`; its ED and
    ES manifest rows."""
    rows, written = [], []
    phases = ((loaded.ed, loaded.ed_label, "ed"), (loaded.es, loaded.es_label, "es"))
    try:
        for phase, (image, label, tag) in enumerate(phases):
            row = {"image": f"images/{name}_{tag}.nii.gz", "label": "", "subject": subject}
            written.append(folder / row["image"])
            site_folder.write_volume(written[-1], image, np.float32)
            if label is not None:
                row["label"] = f"labels/{name}_{tag}.nii.gz"
                written.append(folder / row["label"])
                site_folder.write_volume(written[-1], label, np.uint8)
            rows.append({**row, **texts, PHASE: str(phase)})
    except BaseException:  # no file of a subject the manifest will not list
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return rows


def file_stem(subject: str, taken: set[str]) -> str:
    """A file-name-safe form of a subject id (letters, digits, '-' and '_'), not yet in
    `taken` (ids differing only in other characters get -2, -3, ...); added to it."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", subject).strip("_")[:64] or "subject"
    name, n = stem, 1
    while name.casefold() in taken:
        n += 1
        name = f"{stem}-{n}"
    taken.add(name.casefold())
    return name


def manifest_text(rows: list[dict[str, str]], names: list[str]) -> str:
    """manifest.csv: image, label, subject, then the config's attributes in its order."""
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer, ["image", "label", "subject", *names], lineterminator="\n", extrasaction="ignore"
    )
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _reason(exc: BaseException) -> str:
    """One line: the message of our errors, the kind and first line of any other."""
    if isinstance(exc, VolumeError | FedsynthError | ValueError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"cannot be read or written ({exc.strerror or type(exc).__name__})"
    lines = str(exc).strip().splitlines()
    return f"could not be read ({type(exc).__name__}: {lines[0] if lines else ''})"
