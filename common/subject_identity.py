"""One person is one subject: the privacy unit a site's rows are grouped into.

DP-SGD bounds what training reveals about one subject; a person whose rows count as two
subjects has their privacy loss multiplied. So a site's subject ids are read as persons:

- Ids are compared after `normalise_id` (Unicode NFKC, case-folded, invisible characters
  and surrounding whitespace removed): "José-001" in NFC or NFD, with a zero-width space or
  in full-width digits is one id. Distinct spellings that normalise alike are one subject
  if their per-person attributes agree (a warning names both spellings); if they disagree
  they are two people whose ids collide, and the rows of the later spelling are refused.
- The same scan under two ids is found by its content (`content_fingerprint`: the decoded
  voxels in the short-axis frame, whatever the file format, compression, data type or
  storage order). The later row is refused as a duplicate, and the two ids are merged into
  one subject with all their rows (union-find over every such link), with a warning.
  Merging is the safe direction: two people counted as one only cost utility.
- Rows of one subject must agree on the per-person attributes the config has
  (`PERSON_ATTRIBUTES`): a different sex refuses the later row (one of the two rows is
  wrong, and no later rule can say which); an age or BMI more than its tolerance apart is
  warned about, not refused, because scans of one person at two visits legitimately differ
  by a year or some kilograms, and the rows count as one subject either way.

Everything here stays at the site: the check's findings go only to the local site-check.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedsynth.common.attribute_checks import check_physiology, describe
from fedsynth.common.config import Attribute
from fedsynth.common.orientation import OrientationError, to_short_axis

# per-person attributes and how far two rows of one person may differ (None: not at all)
PERSON_ATTRIBUTES: dict[str, float | None] = {"sex": None, "age": 1.0, "bmi": 1.0}


def normalise_id(raw: str) -> str:
    """The key a subject id is compared by: NFKC (full-width digits become ASCII, NFC and
    NFD agree), invisible format characters (Unicode category Cf: zero-width space, soft
    hyphen, byte-order mark) removed, surrounding whitespace stripped, case-folded. Empty
    for an id with nothing visible."""
    text = unicodedata.normalize("NFKC", raw)
    text = "".join(c for c in text if unicodedata.category(c) != "Cf").strip()
    return unicodedata.normalize("NFKC", text.casefold())


def how_they_differ(a: str, b: str) -> str:
    """What `normalise_id` sets aside between two spellings of one key, for a message
    ('case', 'invisible characters and case', ...): an NFC and an NFD spelling print alike."""
    differences, plain = [], []
    for spelling in (a, b):
        composed = unicodedata.normalize("NFC", spelling)
        if composed != spelling:
            differences.append("Unicode composition (NFC/NFD)")
        if unicodedata.normalize("NFKC", composed) != composed:
            differences.append("compatibility characters (full-width digits, ligatures)")
        visible = "".join(c for c in spelling if unicodedata.category(c) != "Cf")
        if visible != spelling:
            differences.append("invisible characters")
        if visible != visible.strip():
            differences.append("surrounding whitespace")
        plain.append(unicodedata.normalize("NFKC", visible).strip())
    if plain[0] != plain[1] and plain[0].casefold() == plain[1].casefold():
        differences.append("case")
    unique = list(dict.fromkeys(differences)) or ["Unicode form"]
    return " and ".join(unique) if len(unique) < 3 else f"{', '.join(unique[:-1])} and {unique[-1]}"


def content_fingerprint(data: np.ndarray, affine: np.ndarray) -> str:
    """SHA-256 of a decoded volume's voxels (X, Y, Z; after scl_slope/inter, as float32)
    in the short-axis frame, with their shape: the same for the same scan in any file
    format, compression, data type that holds its values exactly, or voxel storage order
    (to_short_axis only permutes and flips). Raises ValueError for an affine that gives
    no short-axis frame."""
    try:
        oriented, _ = to_short_axis(data, affine)
    except OrientationError as exc:
        raise ValueError(str(exc)) from None
    values = np.ascontiguousarray(oriented, dtype=np.float32) + np.float32(0.0)  # -0.0 is 0.0
    digest = hashlib.sha256(repr(values.shape).encode())
    digest.update(values.tobytes())
    return digest.hexdigest()


@dataclass
class RowIdentity:
    """Who a manifest row belongs to, as `SubjectUnits.check_row` found it."""

    row: int
    spelling: str  # the id as the manifest writes it (surrounding whitespace stripped)
    key: str  # normalise_id(spelling)
    person: dict[str, float]  # the row's per-person attributes
    notes: list[str] = field(default_factory=list)  # warnings about this row
    fingerprint: str | None = None  # of its voxels, once read


@dataclass
class _Person:
    """A normalised id's first usable row, and the spellings accepted for it."""

    row: int
    spelling: str
    attributes: dict[str, float]
    spellings: set[str]


class SubjectUnits:
    """The subjects of one site, built row by row during a site check.

    Per row: `check_row` before the image is read, then `check_path`, `check_content` once
    its voxels are read, `accept` when the row is usable; at the end `subjects` gives each
    usable row its subject. Site-wide findings (merged ids) collect in `warnings`.
    """

    def __init__(self, attributes: Sequence[Attribute]) -> None:
        self.attributes = tuple(attributes)
        self.by_name = {a.name: a for a in attributes}
        self.people: dict[str, _Person] = {}
        self.refused: dict[str, str] = {}  # spelling -> why all its rows are refused
        self.parent: dict[str, str] = {}  # union-find over keys
        self.paths: dict[Path, RowIdentity] = {}  # image file -> first row naming it
        self.seen: dict[str, RowIdentity] = {}  # fingerprint -> first row read with it
        self.used: dict[str, int] = {}  # fingerprint -> usable row
        self.usable: dict[int, RowIdentity] = {}  # by row
        self.warnings: list[str] = []  # about the site's subjects (several rows)

    def check_row(self, row: int, spelling: str, values: Mapping[str, float]) -> RowIdentity:
        """Normalise the row's id and check its attributes (`check_physiology`, and against
        the subject's first usable row); raises ValueError with the reason it is refused."""
        key = normalise_id(spelling)
        if not key:
            raise ValueError(f"subject id {spelling!r} has no visible characters")
        check_physiology(values, self.attributes)
        if spelling in self.refused:
            raise ValueError(self.refused[spelling])
        person = {name: values[name] for name in PERSON_ATTRIBUTES if name in self.by_name}
        identity = RowIdentity(row, spelling, key, person)
        first = self.people.get(key)
        if first is None:
            return identity
        collides = spelling not in first.spellings
        refusals, warnings = self._compare(first, person, f"in row {row}" if collides else "here")
        if collides and (refusals or warnings):
            self.refused[spelling] = (
                f"subject id {spelling!r} is the same id as {first.spelling!r} (row {first.row}) "
                f"but for {how_they_differ(first.spelling, spelling)}, and "
                f"{'; '.join(refusals + warnings)}: two people whose ids collide; "
                "give one of them another id"
            )
            raise ValueError(self.refused[spelling])
        if refusals:
            raise ValueError(f"{'; '.join(refusals)} of subject {first.spelling!r}")
        identity.notes += [f"{w} of subject {first.spelling!r}" for w in warnings]
        return identity

    def _compare(
        self, first: _Person, person: Mapping[str, float], where: str
    ) -> tuple[list[str], list[str]]:
        """Disagreements of a row (`where`: 'here' or 'in row N') with the subject's first
        row: (refusing, warned)."""
        refusals: list[str] = []
        warnings: list[str] = []
        for name, value in person.items():
            tolerance, earlier = PERSON_ATTRIBUTES[name], first.attributes[name]
            if abs(value - earlier) <= (tolerance or 0.0):
                continue
            attribute = self.by_name[name]
            text = f"{name} {describe(value, attribute)} {where}, {describe(earlier, attribute)}"
            text += f" in row {first.row}"
            (refusals if tolerance is None else warnings).append(text)
        return refusals, warnings

    def check_path(self, identity: RowIdentity, path: Path) -> None:
        """Refuse (ValueError) a row naming the image file an earlier row names; under
        another id, that makes the two ids one subject."""
        earlier = self.paths.setdefault(path, identity)
        if earlier is not identity:
            merged = self._merge(earlier, identity, "name the same image file")
            raise ValueError(f"duplicate of row {earlier.row} (same image){merged}")

    def check_content(self, identity: RowIdentity, data: np.ndarray, affine: np.ndarray) -> None:
        """Fingerprint the row's decoded voxels (X, Y, Z, oriented by the affine); the same voxels
        as an earlier row's (usable or not) make their ids one subject, and a ValueError
        refuses this row as a duplicate when the earlier row is usable."""
        identity.fingerprint = content_fingerprint(data, affine)
        earlier = self.seen.setdefault(identity.fingerprint, identity)
        merged = self._merge(earlier, identity, "hold the same voxels")
        if identity.fingerprint in self.used:
            raise ValueError(
                f"duplicate of row {self.used[identity.fingerprint]} (same voxels){merged}"
            )

    def _merge(self, earlier: RowIdentity, identity: RowIdentity, evidence: str) -> str:
        """Make the ids of two rows that are one scan one subject, with a site warning;
        returns what a duplicate's refusal adds ('' for rows of one id)."""
        if earlier.key == identity.key:
            return ""
        self._union(earlier.key, identity.key)
        self.warnings.append(
            f"rows {earlier.row} and {identity.row} {evidence} under subject ids "
            f"{earlier.spelling!r} and {identity.spelling!r}: one person, counted as one "
            "subject with all rows of both ids"
        )
        return f"; subject ids {earlier.spelling!r} and {identity.spelling!r} count as one subject"

    def accept(self, identity: RowIdentity) -> None:
        """Register a usable row: its id, attributes and voxels count from now on."""
        first = self.people.setdefault(
            identity.key,
            _Person(identity.row, identity.spelling, identity.person, {identity.spelling}),
        )
        if identity.spelling not in first.spellings:
            first.spellings.add(identity.spelling)
            how = how_they_differ(first.spelling, identity.spelling)
            self.warnings.append(
                f"subject ids {first.spelling!r} (row {first.row}) and {identity.spelling!r} "
                f"(row {identity.row}) differ only in {how} and their attributes agree: "
                "counted as one subject"
            )
        if identity.fingerprint is not None:
            self.used.setdefault(identity.fingerprint, identity.row)
        self.usable[identity.row] = identity

    def subjects(self) -> dict[int, str]:
        """Each usable row's subject: the first spelling (in row order) of the person it
        belongs to, so that the rows of ids found to be one person share one subject."""
        name: dict[str, str] = {}
        for row in sorted(self.usable):
            name.setdefault(self._find(self.usable[row].key), self.usable[row].spelling)
        return {row: name[self._find(i.key)] for row, i in self.usable.items()}

    def _find(self, key: str) -> str:
        while (parent := self.parent.get(key, key)) != key:
            self.parent[key] = self.parent.get(parent, parent)
            key = parent
        return key

    def _union(self, a: str, b: str) -> None:
        root_a, root_b = self._find(a), self._find(b)
        if root_a != root_b:
            self.parent[max(root_a, root_b)] = min(root_a, root_b)
