"""A study's fixed terms (run-dir/terms.json): what a resume may not change.

Each term is fixed when the study starts, because what the study already did or will
state rests on it:
- delta, accountant: every epsilon in the ledger is computed with them (the same spend is
  epsilon 9.95 at delta 1e-5 and 5.23 at 0.04);
- target epsilon: the sites planned their noise to land on it, and a site that gave no
  reply is charged up to it (server/privacy_ledger.py);
- min-sites: every aggregated round holds at least that many sites' updates, which the
  privacy statement says (and SecAgg+'s threshold is never below it);
- secure aggregation: the statement claims SecAgg+ only for the rounds that ran under it.

A resume that changes one is refused in one line. So is a resume of a study whose
terms.json is gone (the run dir holds its ledger, site bindings, saved rounds or state):
its study id, which the sites tag their rounds with, cannot be recovered, and fresh terms
would let it continue under other ones as a new study whose sites no longer report the
old one's spend; the operator restores terms.json from a backup or starts a new study. A
terms.json that is not the study's terms (unreadable, not a JSON object, a term or the
study id of the wrong type) is refused likewise. A run dir whose terms.json predates a
term (it fixed only delta and accountant) gets it from the run dir's own records: the
`config.yaml` each saved round checkpoint holds (the config of the run that saved it).
When those rounds agree, that value is the term and terms.json is completed with it; with
no saved round and nothing charged the study has not started, so the resume's value is
fixed; otherwise (rounds that disagree, or spend charged before any round was saved) the
term cannot be shown and the resume is refused.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedsynth.common.config import Config
from fedsynth.common.errors import FedsynthError
from fedsynth.common.io import atomic_write_text, read_json_object
from fedsynth.common.ledger import read_ledger
from fedsynth.server.run_dir import LEDGER, STATE, SUMMARY
from fedsynth.server.site_identity import SITE_IDENTITIES

TERMS = "terms.json"


@dataclass(frozen=True)
class Term:
    """One fixed term: its key in terms.json, its config key, and why it is fixed."""

    key: str  # in terms.json
    section: str  # config section
    name: str  # config key within the section (as config files spell it)
    why: str
    value: Callable[[Config], Any]
    kind: type  # of its value in terms.json (a float term may be written as an int)

    @property
    def config_key(self) -> str:
        return f"{self.section}.{self.name}"


FIXED = (
    Term(
        "delta",
        "privacy",
        "delta",
        "every epsilon in its ledger is computed with it",
        lambda c: c.privacy.delta,
        float,
    ),
    Term(
        "accountant",
        "privacy",
        "accountant",
        "every epsilon in its ledger is computed with it",
        lambda c: c.privacy.accountant,
        str,
    ),
    Term(
        "target_epsilon",
        "privacy",
        "target-epsilon",
        "the sites planned their noise for it and no-reply estimates are charged up to it",
        lambda c: c.privacy.target_epsilon,
        float,
    ),
    Term(
        "min_sites",
        "federation",
        "min-sites",
        "its privacy statement says every aggregated round holds at least that many sites",
        lambda c: c.federation.min_sites,
        int,
    ),
    Term(
        "secure_aggregation",
        "federation",
        "secure-aggregation",
        "its privacy statement says which rounds ran under SecAgg+",
        lambda c: bool(c.federation.secure_aggregation),
        bool,
    ),
)


def _round_values(run_dir: Path, term: Term) -> dict[Any, list[int]]:
    """The term's value in each saved round checkpoint's config.yaml -> those rounds."""
    values: dict[Any, list[int]] = {}
    for path in sorted((run_dir / "rounds").glob("round-*/config.yaml")):
        try:
            raw = yaml.safe_load(path.read_text())
            value = raw[term.section][term.name]
            number = int(path.parent.name.removeprefix("round-"))
        except (OSError, yaml.YAMLError, TypeError, KeyError, ValueError):
            raise FedsynthError(
                f"{path} is damaged: cannot read the {term.config_key} that round ran with"
            ) from None
        values.setdefault(value, []).append(number)
    return values


def _established(run_dir: Path, term: Term, asked: Any) -> Any:
    """The value of a term terms.json predates, from the run dir's records (module doc).
    Raises FedsynthError when the records cannot show one value."""
    values = _round_values(run_dir, term)
    if len(values) == 1:
        return next(iter(values))
    where = run_dir / TERMS
    if len(values) > 1:
        ran = "; ".join(f"{v!r} in round(s) {', '.join(map(str, r))}" for v, r in values.items())
        raise FedsynthError(
            f"{where} predates a fixed {term.config_key} and the study's rounds ran with "
            f"different ones ({ran}): it cannot be resumed; release it as it is or start a "
            "new study"
        )
    if read_ledger(run_dir / LEDGER):
        raise FedsynthError(
            f"{where} predates a fixed {term.config_key}, and the study charged spend before "
            "it saved any round, so nothing shows which one that spend was planned for: it "
            "cannot be resumed; start a new study"
        )
    return asked  # nothing done yet: the resume's value is the study's


KINDS = {float: "a number", int: "a whole number", str: "a string", bool: "true or false"}


def _of_kind(value: Any, kind: type) -> bool:
    """Whether a terms.json value is of a term's kind (JSON writes 10.0 as 10.0, but a
    hand-restored file may say 10; a bool is never a number here)."""
    if isinstance(value, bool) != (kind is bool):
        return False
    return isinstance(value, (int, float) if kind is float else kind)


def read_terms(path: Path) -> dict[str, Any]:
    """terms.json's fixed terms, each of its kind, and study id (a non-empty string where
    present: a resume requires it, a release checks it against every saved round's).
    Raises FedsynthError naming the file when it is missing or not the study's terms."""
    what = "restore it from a backup, or start a new study"
    fixed = read_json_object(path, what)
    if "study_id" in fixed and not (isinstance(fixed["study_id"], str) and fixed["study_id"]):
        raise FedsynthError(f"{path} is damaged (its study id is not a string): {what}")
    for term in FIXED:
        if term.key in fixed and not _of_kind(fixed[term.key], term.kind):
            raise FedsynthError(
                f"{path} is damaged (its {term.key} is {json.dumps(fixed[term.key])}, not "
                f"{KINDS[term.kind]}): {what}"
            )
    return fixed


def _begun(run_dir: Path) -> list[str]:
    """What in the run dir shows that a study began there: the records written only after
    its terms.json (the ledger, the site bindings made at the first READY, a state or
    summary, a saved round)."""
    found = [
        name for name in (LEDGER, SITE_IDENTITIES, STATE, SUMMARY) if (run_dir / name).exists()
    ]
    if any((run_dir / "rounds").glob("round-*")):
        found.append("rounds/")
    return found


def fix_terms(config: Config, run_dir: Path, resume: bool) -> str:
    """Record the study's id and fixed terms at its start; on a resume, refuse one that
    changes any of them, or whose terms.json is gone or damaged, and complete a terms.json
    that predates some (module doc). Returns the study id (a random hex string).

    Raises FedsynthError naming the file or the changed term, both values and what to do.
    """
    path = run_dir / TERMS
    ours = {term.key: term.value(config) for term in FIXED}
    begun = _begun(run_dir) if resume else []
    if not (resume and (path.exists() or begun)):  # a new study, or one that never began
        study_id = uuid.uuid4().hex
        atomic_write_text(path, json.dumps({**ours, "study_id": study_id}) + "\n")
        return study_id
    if not path.exists():
        raise FedsynthError(
            f"{path} is missing, but {run_dir} holds a study that began ({', '.join(begun)}): "
            "its study id, which the sites tag their rounds with, and its fixed terms cannot "
            "be recovered, so it cannot be resumed; restore terms.json from a backup, or "
            "start a new study in a new run-dir"
        )
    fixed = read_terms(path)
    if "study_id" not in fixed:
        raise FedsynthError(
            f"{path} is damaged (no study id): restore it from a backup, or start a new study"
        )
    study_id = fixed["study_id"]
    missing = [term for term in FIXED if term.key not in fixed]
    for term in FIXED:
        if term.key in fixed:
            value, since = fixed[term.key], "fixed when it started"
        else:
            value = _established(run_dir, term, ours[term.key])
            since = "the value its saved rounds ran with"
        if value != ours[term.key]:
            raise FedsynthError(
                f"{run_dir}: this study's {term.config_key} is {value!r}, {since}; the "
                f"resume asks for {ours[term.key]!r}. {term.why[0].upper()}{term.why[1:]}: "
                "resume with the same value, or start a new study"
            )
    if missing:
        atomic_write_text(path, json.dumps({**ours, **fixed}) + "\n")
    return study_id
