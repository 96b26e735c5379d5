"""The release's record of its cohort: the SHA-256 of every file in `cohort/`.

`fedsynth release` writes RELEASE/cohort.sha256 in `sha256sum` format (one line per file,
"<64 hex>  cohort/<name>", sorted; `sha256sum -c cohort.sha256` checks it from the release
folder). `fedsynth audit --release RELEASE` audits only a cohort that matches it file for
file: a folder with a file the release does not list (e.g. a patient's volume slipped in
as "the cohort"), a file whose bytes differ, or a listed file missing is refused in one
line naming the file. The record's own SHA-256 is the cohort's fingerprint: report.html
shows it, and each audit carries the fingerprint of the cohort it measured, so a reader can
see that the audit and the published release concern the same volumes.
"""

from __future__ import annotations

import re
from pathlib import Path

from fedsynth.common.checkpoint import file_sha256
from fedsynth.common.errors import FedsynthError
from fedsynth.common.io import PUBLIC_MODE, atomic_write_text
from fedsynth.common.sampling import COHORT

COHORT_HASHES = "cohort.sha256"
_LINE = re.compile(r"([0-9a-f]{64})  (\S+)")


def cohort_files(release: Path) -> list[str]:
    """Every entry under release/cohort as "cohort/<relative path>", sorted (folders
    included as their files; hidden files too: nothing in the folder goes unlisted)."""
    root = release / COHORT
    return sorted(
        f"{COHORT}/{p.relative_to(root).as_posix()}" for p in root.rglob("*") if not p.is_dir()
    )


def write_cohort_hashes(release: Path) -> str:
    """Write release/cohort.sha256 (0644) for the files now in release/cohort; return the
    cohort's fingerprint (the record's SHA-256)."""
    lines = [f"{file_sha256(release / name)}  {name}\n" for name in cohort_files(release)]
    atomic_write_text(release / COHORT_HASHES, "".join(lines), PUBLIC_MODE)
    return file_sha256(release / COHORT_HASHES)


def read_cohort_hashes(record: Path) -> dict[str, str]:
    """{"cohort/<name>": hex} from a cohort.sha256; FedsynthError naming the file and line
    when it is missing or a line is not "<64 hex>  cohort/<name>"."""
    try:
        text = record.read_text()
    except (OSError, UnicodeDecodeError):
        raise FedsynthError(
            f"{record} is missing or unreadable: a release records its cohort there"
        ) from None
    listed: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        match = _LINE.fullmatch(line)
        if not match or not match[2].startswith(f"{COHORT}/") or match[2] in listed:
            raise FedsynthError(f"{record} line {number} is not '<sha256>  {COHORT}/<file>'")
        listed[match[2]] = match[1]
    if not listed:
        raise FedsynthError(f"{record} lists no file")
    return listed


def check_cohort_hashes(release: Path) -> str:
    """Refuse release/cohort unless it holds exactly the files release/cohort.sha256 lists,
    each with its SHA-256; return the fingerprint. Each refusal is one line naming a file."""
    record = release / COHORT_HASHES
    listed = read_cohort_hashes(record)
    present = cohort_files(release)
    for name in present:
        if name not in listed:
            raise FedsynthError(f"{release / name} is not in the release's {COHORT_HASHES}")
    for name, expected in listed.items():
        if name not in present:
            raise FedsynthError(f"{release / name} is listed in {COHORT_HASHES} but missing")
        if file_sha256(release / name) != expected:
            raise FedsynthError(f"{release / name} differs from its SHA-256 in {COHORT_HASHES}")
    return file_sha256(record)
