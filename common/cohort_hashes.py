"""The release's record of its cohort: the SHA-256 of every file in `cohort/`.

`fedsynth release` writes RELEASE/cohort.sha256 in `sha256sum` format (one line per file,
"<64 hex>  cohort/<name>", sorted; `sha256sum -c cohort.sha256` checks it from the release
folder). `fedsynth audit --release RELEASE` audits only a cohort that matches it file for
file: a folder with a file the release does not list (e.g. a patient's volume slipped in
as "the cohort"), a file whose bytes differ, or a listed file missing is refused in one
line naming the file. The record's own SHA-256 is the cohort's fingerprint: the release's
privacy.json names it (`cohort_sha256`, beside the study's `study_id`) and report.html
shows it, and each audit carries the fingerprint of the cohort it measured, so a reader can
see that the audit and the published release concern the same volumes.

The record cannot vouch for itself (anyone can write a cohort.sha256 for any folder), so
the audit also requires the folder's privacy.json, written by `fedsynth release`, to name
a study and this fingerprint. A folder faked whole could carry a matching privacy.json too:
the site compares the fingerprint the audit prints with the one in the coordinator's
published report before sharing (docs/release.md).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from fedsynth.common.checkpoint import file_sha256
from fedsynth.common.errors import FedsynthError
from fedsynth.common.io import PUBLIC_MODE, atomic_write_text
from fedsynth.common.privacy_verify import STATEMENT
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


def check_statement(release: Path, fingerprint: str) -> str:
    """The study id of release/privacy.json, refused unless that statement names a study
    and the cohort `fingerprint` (a folder the study never released has no such record)."""
    path = release / STATEMENT
    try:
        statement = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        raise FedsynthError(
            f"{path} is missing or not JSON: audit a folder `fedsynth release` wrote"
        ) from None
    study = statement.get("study_id") if isinstance(statement, dict) else None
    if not isinstance(study, str) or not study:
        raise FedsynthError(f"{path} names no study (study_id): not a fedsynth release")
    if statement.get("cohort_sha256") != fingerprint:
        raise FedsynthError(
            f"{path} does not name this cohort's fingerprint (cohort_sha256): the cohort is "
            "not the one the study released"
        )
    return study


def check_cohort_hashes(release: Path) -> str:
    """Refuse release/cohort unless it holds exactly the files release/cohort.sha256 lists,
    each with its SHA-256, and release/privacy.json names that record's fingerprint
    (check_statement); return the fingerprint. Each refusal is one line naming a file."""
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
    fingerprint = file_sha256(record)
    check_statement(release, fingerprint)
    return fingerprint
