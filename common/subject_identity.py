"""One person is one subject: the privacy unit a site's rows are grouped into.

DP-SGD bounds what training reveals about one subject; a person whose rows count as two
subjects has their privacy loss multiplied. So a site's subject ids are read as persons:

- Ids are compared after `normalise_id` (Unicode NFKC, case-folded, invisible characters
  (format characters and every other default-ignorable code point) and surrounding
  whitespace removed): "José-001" in NFC or NFD, with a zero-width space, a variation
  selector or in full-width digits is one id. Distinct spellings that normalise alike are
  one subject if their per-person attributes agree (a warning names both spellings); if
  they disagree they are two people whose ids collide, and the rows of the later spelling
  are refused.
- Ids of digits only compare as the number they spell ("00123" and "123": a spreadsheet
  drops leading zeros), then by the same rule.
- The same scan under two ids is found by its content (scan_match.py: the decoded voxels
  in the short-axis frame, and as stored for a copy whose header lost its orientation, to
  1e-5 of their range, whatever the file format, compression, data type, storage order or
  float32 rounding of a re-export). The later row is refused as a duplicate, and the two
  ids are merged into one subject with all their rows (union-find over every such link,
  and over rows naming one file), with a warning. A row refused for another reason than
  its image (a label map, an attribute) still has its scan read to link ids
  (`link_refused`). Merging is the safe direction: two people counted as one only cost
  utility.
- Rows of one subject must agree on the per-person attributes the config has
  (`PERSON_ATTRIBUTES`): a different sex refuses the later row (one of the two rows is
  wrong, and no later rule can say which); an age or BMI more than its tolerance apart is
  warned about, not refused, because scans of one person at two visits legitimately differ
  by a year or some kilograms, and the rows count as one subject either way. Ids merged
  as one person are held to the same rule once all rows are read (`finish`): a row of a
  later id whose sex differs from the merged subject's first row is refused.

Everything here stays at the site: the check's findings go only to the local site-check.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedsynth.common.attribute_checks import check_physiology, describe
from fedsynth.common.config import Attribute
from fedsynth.common.errors import FedsynthError
from fedsynth.common.scan_match import Loader, ScanIndex, views

# per-person attributes and how far two rows of one person may differ (None: not at all)
PERSON_ATTRIBUTES: dict[str, float | None] = {"sex": None, "age": 1.0, "bmi": 1.0}


# Default_Ignorable_Code_Point, from the Unicode Character Database, DerivedCoreProperties.txt
# (Unicode 15.1): code points that print as nothing, beyond category Cf also the combining
# grapheme joiner U+034F and the variation selectors (Mn), the Hangul fillers (Lo).
DEFAULT_IGNORABLE: tuple[tuple[int, int], ...] = (
    (0x00AD, 0x00AD),
    (0x034F, 0x034F),
    (0x061C, 0x061C),
    (0x115F, 0x1160),
    (0x17B4, 0x17B5),
    (0x180B, 0x180F),
    (0x200B, 0x200F),
    (0x202A, 0x202E),
    (0x2060, 0x206F),
    (0x3164, 0x3164),
    (0xFE00, 0xFE0F),
    (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0),
    (0xFFF0, 0xFFF8),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF),
)


def invisible(c: str) -> bool:
    """Whether a character prints as nothing: category Cf (format) or Default_Ignorable."""
    point = ord(c)
    return unicodedata.category(c) == "Cf" or any(
        low <= point <= high for low, high in DEFAULT_IGNORABLE
    )


def normalise_id(raw: str) -> str:
    """The key a subject id is compared by: NFKC (full-width digits become ASCII, NFC and
    NFD agree), invisible characters (`invisible`: zero-width space, soft hyphen, byte-order
    mark, combining grapheme joiner, variation selectors, Hangul filler) removed,
    surrounding whitespace stripped, case-folded; an id of ASCII digits only becomes the
    number it spells ("00123" -> "123"). Empty for an id with nothing visible."""
    text = _visible(raw)
    key = unicodedata.normalize("NFKC", text.casefold())
    return (key.lstrip("0") or "0") if key.isascii() and key.isdigit() else key


def _visible(raw: str) -> str:
    """NFKC, invisible characters removed, surrounding whitespace stripped."""
    text = unicodedata.normalize("NFKC", raw)
    return "".join(c for c in text if not invisible(c)).strip()


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
        visible = "".join(c for c in spelling if not invisible(c))
        if visible != spelling:
            differences.append("invisible characters")
        if visible != visible.strip():
            differences.append("surrounding whitespace")
        plain.append(_visible(spelling))
    if plain[0] != plain[1] and plain[0].casefold() == plain[1].casefold():
        differences.append("case")
    if plain[0] != plain[1] and all(p.isascii() and p.isdigit() for p in plain):
        differences.append("leading zeros")
    unique = list(dict.fromkeys(differences)) or ["Unicode form"]
    return " and ".join(unique) if len(unique) < 3 else f"{', '.join(unique[:-1])} and {unique[-1]}"


@dataclass
class RowIdentity:
    """Who a manifest row belongs to, as `SubjectUnits.check_row` found it."""

    row: int
    spelling: str  # the id as the manifest writes it (surrounding whitespace stripped)
    key: str  # normalise_id(spelling)
    person: dict[str, float]  # the row's per-person attributes
    notes: list[str] = field(default_factory=list)  # warnings about this row
    scan: int | None = None  # its voxels' number in SubjectUnits.scans, once read


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
    its voxels are read, `accept` when the row is usable, or `link_refused` when it is
    refused before `check_content`; at the end `finish` holds the
    rows of merged ids to one person's attributes and `subjects` gives each usable row its
    subject. Site-wide findings (merged ids) collect in `warnings`. `load` reads a volume
    again (scan_match.Loader) to confirm that a row holds an earlier row's scan.
    """

    def __init__(self, attributes: Sequence[Attribute], load: Loader) -> None:
        self.attributes = tuple(attributes)
        self.by_name = {a.name: a for a in attributes}
        self.people: dict[str, _Person] = {}
        self.refused: dict[str, str] = {}  # spelling -> why all its rows are refused
        self.parent: dict[str, str] = {}  # union-find over keys
        self.paths: dict[Path, RowIdentity] = {}  # image file -> first row naming it
        self.scans = ScanIndex(load)  # the distinct scans read
        self.first_read: list[RowIdentity] = []  # by scan: the first row read with it
        self.used: dict[int, int] = {}  # scan -> its usable row
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
        where = f"in row {row}" if collides else "here"
        refusals, warnings = self._compare(first.row, first.attributes, person, where)
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
        self, first_row: int, first: Mapping[str, float], person: Mapping[str, float], where: str
    ) -> tuple[list[str], list[str]]:
        """Disagreements of a row's per-person attributes (`where`: 'here' or 'in row N')
        with those of the subject's first row: (refusing, warned)."""
        refusals: list[str] = []
        warnings: list[str] = []
        for name, value in person.items():
            tolerance, earlier = PERSON_ATTRIBUTES[name], first[name]
            if abs(value - earlier) <= (tolerance or 0.0):
                continue
            attribute = self.by_name[name]
            text = f"{name} {describe(value, attribute)} {where}, {describe(earlier, attribute)}"
            text += f" in row {first_row}"
            (refusals if tolerance is None else warnings).append(text)
        return refusals, warnings

    def check_path(self, identity: RowIdentity, path: Path) -> None:
        """Refuse (ValueError) a row naming the image file an earlier row names; under
        another id, that makes the two ids one subject."""
        earlier = self.paths.setdefault(path, identity)
        if earlier is not identity:
            merged = self._merge(earlier, identity, "name the same image file")
            raise ValueError(f"duplicate of row {earlier.row} (same image){merged}")

    def check_content(
        self, identity: RowIdentity, data: np.ndarray, affine: np.ndarray, path: Path
    ) -> None:
        """Match the row's decoded voxels (X, Y, Z, oriented by the affine; read from `path`)
        with those of earlier rows (scan_match.py), in the short-axis frame and as stored (a
        re-export may have lost the header's orientation); the same scan as an earlier row's
        (usable or not) makes their ids one subject, and a ValueError refuses this row as a
        duplicate when the earlier row is usable."""
        volume = views(data, affine)
        scan = self.scans.find(volume)
        if scan is None:
            identity.scan = self.scans.add(volume, path)
            self.first_read.append(identity)
            return
        identity.scan = scan
        merged = self._merge(self.first_read[scan], identity, "hold the same voxels")
        if scan in self.used:
            raise ValueError(f"duplicate of row {self.used[scan]} (same voxels){merged}")

    def link_refused(
        self,
        identity: RowIdentity | None,
        row: int,
        spelling: str,
        path: Path,
        read: Callable[[], tuple[np.ndarray, np.ndarray]],
    ) -> None:
        """Register the scan of a row refused before its voxels were matched (a label map,
        an attribute, its id's attributes), so that the same scan or file under another id
        still makes the ids one subject (with `check_content`'s site warning); the row stays
        refused. `identity`: the row's if `check_row` passed it; `read`: the row's voxels
        (X, Y, Z) and affine, raising FedsynthError, OSError or ValueError when unreadable
        (nothing is linked then)."""
        if identity is None:
            key = normalise_id(spelling)
            if not key:
                return
            identity = RowIdentity(row, spelling, key, {})
        earlier = self.paths.setdefault(path, identity)
        if earlier is not identity:  # the earlier row's scan stands for this file
            self._merge(earlier, identity, "name the same image file")
            return
        try:
            self.check_content(identity, *read(), path)
        except (FedsynthError, OSError, ValueError):
            return  # unreadable, or a usable row's scan (linked): the row is refused anyway

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
        if identity.scan is not None:
            self.used.setdefault(identity.scan, identity.row)
        self.usable[identity.row] = identity

    def finish(self, strict: bool = False) -> tuple[dict[int, str], dict[int, list[str]]]:
        """Hold the rows of ids merged as one person (same scan or file) to that person's
        attributes, as `check_row` holds the rows of one id: each usable row of another id
        than the merged subject's first row is compared with that row. Returns the rows
        refused (a different sex, or with `strict` any disagreement; they are no longer
        usable) and the warnings of the others (age or BMI beyond tolerance), by row."""
        refused: dict[int, str] = {}
        warned: dict[int, list[str]] = {}
        first_of: dict[str, RowIdentity] = {}
        for row in sorted(self.usable):
            identity = self.usable[row]
            first = first_of.setdefault(self._find(identity.key), identity)
            if first.key == identity.key:
                continue  # rows of one id: checked row by row (check_row)
            refusals, warnings = self._compare(first.row, first.person, identity.person, "here")
            why = (
                f" of subject {first.spelling!r} (subject id {identity.spelling!r} is the same "
                "person: the ids share a scan)"
            )
            if refusals:
                refused[row] = "; ".join(refusals) + why
            elif warnings and strict:
                refused[row] = "; ".join(w + why for w in warnings) + " (--strict)"
            elif warnings:
                warned[row] = [w + why for w in warnings]
        for row in refused:
            del self.usable[row]
        return refused, warned

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
