"""Recompute a released cohort's epsilons from the ledger copied beside its statement.

Anyone holding a release (privacy.json + ledger.jsonl) can check it: for each site, the
ledger lines that count (`charged`: trained rounds and no-reply estimates, less the
estimates the site's own report replaced) are Opacus' accountant history; epsilon at the
statement's delta must match what the statement says, for every site and the study.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from fedsynth.common.accountant import epsilon
from fedsynth.common.errors import FedsynthError
from fedsynth.common.ledger import charged, read_ledger, segment_of

STATEMENT = "privacy.json"
LEDGER_COPY = "ledger.jsonl"
REL_TOLERANCE = 1e-6  # the statement's floats went through JSON; the accountant is exact


def verify_release(folder: str | Path) -> dict[str, float]:
    """Site -> epsilon recomputed from folder/ledger.jsonl, each equal to folder/privacy.json's.

    Raises FedsynthError naming the file and the first difference (a missing or damaged
    file, a site in one and not the other, an epsilon or delta that differs).
    """
    folder = Path(folder).expanduser()
    path = folder / STATEMENT
    try:
        statement = json.loads(path.read_text())
        delta, accountant = float(statement["delta"]), str(statement["accountant"])
        stated = {str(k): float(v["epsilon"]) for k, v in statement["sites"].items()}
        study = float(statement["study_epsilon"])
    except FileNotFoundError:
        raise FedsynthError(f"{path} is missing: not a fedsynth release folder") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise FedsynthError(f"{path} is damaged (not a fedsynth privacy statement)") from None
    ledger_path = folder / LEDGER_COPY
    if not ledger_path.is_file():
        raise FedsynthError(f"{ledger_path} is missing: the statement cannot be checked")
    ledger = read_ledger(ledger_path)
    sites = {str(e["site"]) for e in ledger}
    if sites != set(stated):
        raise FedsynthError(
            f"{ledger_path}: sites {', '.join(sorted(sites))} differ from {path}'s "
            f"{', '.join(sorted(stated))}"
        )
    recomputed = {}
    for site, claimed in stated.items():
        lines = charged(ledger, site)
        deltas = {float(e["delta"]) for e in lines}
        if deltas - {delta}:
            raise FedsynthError(f"{ledger_path}: {site} has lines at delta {deltas}, not {delta:g}")
        value = epsilon([segment_of(e) for e in lines], delta, accountant)
        if not math.isclose(value, claimed, rel_tol=REL_TOLERANCE):
            raise FedsynthError(
                f"{ledger_path}: {site} epsilon recomputes to {value:.6g}, {path} says "
                f"{claimed:.6g}"
            )
        recomputed[site] = value
    largest = max(recomputed.values(), default=0.0)
    if not math.isclose(largest, study, rel_tol=REL_TOLERANCE):
        raise FedsynthError(f"study epsilon recomputes to {largest:.6g}, {path} says {study:.6g}")
    return recomputed
