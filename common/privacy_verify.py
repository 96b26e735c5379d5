"""Recompute a released cohort's epsilons from the ledger copied beside its statement.

Anyone holding a release (privacy.json + ledger.jsonl, and site-identities.json when the
study bound sites to identities) can check it, as the release itself did before it
published (common/ledger_history.py, the same code):
- every ledger line's epsilon recomputes from the lines before it (a deleted or edited
  line shows unless every later line was rewritten too);
- every line that replaces a no-reply estimate names an earlier estimate of the same site
  and round, replaced once, by the site's report of a trained round with steps > 0 (or a
  settling line with its valid beside line), from the estimate's identity or one attested
  to succeed it in site-identities.json (without the file, only the estimate's own);
- for each site, the lines that count (`charged`) are Opacus' accountant history; epsilon
  at the statement's delta must match what the statement says, for every site and the
  study, and the statement lists exactly those lines;
- every counted line that is not a server-side no-reply estimate carries its site's
  signature (common/spend_signature.py) under the key the statement names for the site,
  over what the line says, chained to a line of the same site; so a ledger and statement
  rewritten consistently without the sites' keys fail, and estimates, unsigned, can only
  add to a site's spend.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from fedsynth.common.accountant import epsilon
from fedsynth.common.errors import FedsynthError
from fedsynth.common.ledger import charged, read_ledger, segment_of
from fedsynth.common.ledger_history import check_history
from fedsynth.common.site_chain import read_identities_file
from fedsynth.common.spend_signature import verify

STATEMENT = "privacy.json"
LEDGER_COPY = "ledger.jsonl"
IDENTITIES_COPY = "site-identities.json"  # shipped when the study wrote one
REL_TOLERANCE = 1e-6  # the statement's floats went through JSON; the accountant is exact


def verify_release(folder: str | Path) -> dict[str, float]:
    """Site -> epsilon recomputed from folder/ledger.jsonl, each equal to folder/privacy.json's.

    Raises FedsynthError naming the file and the first difference (a missing or damaged
    file, a ledger line whose epsilon or replacement does not hold, see the module doc, a
    site in one and not the other, an epsilon or delta that differs).
    """
    folder = Path(folder).expanduser()
    path = folder / STATEMENT
    if not folder.is_dir():
        raise FedsynthError(f"{folder} is not a folder (give the release folder)")
    try:
        statement = json.loads(path.read_text())
        delta, accountant = float(statement["delta"]), str(statement["accountant"])
        entries = {str(k): dict(v) for k, v in statement["sites"].items()}
        stated = {site: float(entry["epsilon"]) for site, entry in entries.items()}
        study = float(statement["study_epsilon"])
        guarantee = str(statement["guarantee"])
    except FileNotFoundError:
        raise FedsynthError(f"{path} is missing: not a fedsynth release folder") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise FedsynthError(f"{path} is damaged (not a fedsynth privacy statement)") from None
    ledger_path = folder / LEDGER_COPY
    if not ledger_path.is_file():
        raise FedsynthError(f"{ledger_path} is missing: the statement cannot be checked")
    if not ledger_path.read_bytes().endswith(b"\n"):
        raise FedsynthError(f"{ledger_path} ends in a torn or unterminated line")
    ledger = read_ledger(ledger_path)
    if not stated:
        raise FedsynthError(f"{path} states no site")
    sites = {str(e["site"]) for e in ledger}
    if sites != set(stated):
        raise FedsynthError(
            f"{ledger_path}: sites {', '.join(sorted(sites))} differ from {path}'s "
            f"{', '.join(sorted(stated))}"
        )
    identities = read_identities_file(folder / IDENTITIES_COPY)
    try:
        check_history(ledger, identities, delta, accountant, ledger_path)
    except (TypeError, ValueError, KeyError):
        raise FedsynthError(f"{ledger_path}: a line holds a field of the wrong type") from None
    recomputed = {}
    for site, claimed in stated.items():
        lines = charged(ledger, site)
        _check_site(path, ledger_path, site, entries[site], lines, delta, accountant)
        value = epsilon([segment_of(e) for e in lines], delta, accountant)
        if not math.isclose(value, claimed, rel_tol=REL_TOLERANCE):
            raise FedsynthError(
                f"{ledger_path}: {site} epsilon recomputes to {value:.6g}, {path} says "
                f"{claimed:.6g}"
            )
        recomputed[site] = value
        _check_signed(ledger_path, ledger, site, statement, delta, accountant)
    largest = max(recomputed.values(), default=0.0)
    if not math.isclose(largest, study, rel_tol=REL_TOLERANCE):
        raise FedsynthError(f"study epsilon recomputes to {largest:.6g}, {path} says {study:.6g}")
    if f"({largest:.4g}, {delta:g})" not in guarantee:
        raise FedsynthError(
            f"{path}: the guarantee's text does not state ({largest:.4g}, {delta:g})"
        )
    return recomputed


def _check_site(
    path: Path,
    ledger_path: Path,
    site: str,
    entry: dict,
    lines: list[dict],
    delta: float,
    accountant: str,
) -> None:
    """A site's statement entry lists exactly its counted lines, at the study's terms."""
    for e in lines:
        if float(e["delta"]) != delta or e.get("accountant", accountant) != accountant:
            raise FedsynthError(
                f"{ledger_path}: a line of {site} is at delta {e['delta']!r} with the "
                f"{e.get('accountant')!r} accountant; {path} states {delta:g} and {accountant}"
            )
    expected = {
        "delta": delta,
        "noise_multipliers": [float(e["noise_multiplier"]) for e in lines],
        "sample_rates": [float(e["sample_rate"]) for e in lines],
        "steps": [int(e["steps"]) for e in lines],
        "rounds": sorted({int(e["round"]) for e in lines}),
    }
    for key, value in expected.items():
        if entry.get(key) != value:
            raise FedsynthError(f"{path}: {site} {key} differ from the ledger's counted lines")


def _check_signed(
    ledger_path: Path, ledger: list[dict], site: str, statement: dict, delta: float, accountant: str
) -> None:
    """Every counted line of `site` but a no-reply estimate is the site's signed, chained
    line (module doc). Raises FedsynthError naming the first line that is not."""
    keys = statement.get("site_keys") or {}
    study = str(statement.get("study_id"))
    counted = [e for e in charged(ledger, site) if not e.get("estimate")]
    signatures = {e.get("site_signature") for e in counted}
    numbers = {id(line): n for n, line in enumerate(ledger, 1)}
    for e in counted:
        number = numbers[id(e)]
        fields = {**e, "study": study, "previous": e.get("site_previous", "")}
        fields |= {"delta": delta, "accountant": accountant}
        key = keys.get(site)
        signed = (
            isinstance(key, str)
            and e.get("site_key") == key
            and isinstance(e.get("site_signature"), str)
            and verify(key, fields, e["site_signature"])
        )
        if not signed:
            raise FedsynthError(
                f"{ledger_path}, line {number}: {site}'s spend is not signed by {site}'s key "
                "over what the line says: the line was changed, or written without the site"
            )
        if fields["previous"] and fields["previous"] not in signatures:
            raise FedsynthError(
                f"{ledger_path}, line {number}: {site}'s line follows one of its lines that "
                "the ledger no longer holds: a line was dropped"
            )
