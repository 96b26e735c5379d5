"""A server ledger's history checked line by line: what the release checks before it
publishes a ledger (server/finished_study.py) and what `fedsynth privacy verify` checks
in the published copy (common/privacy_verify.py), one implementation for both.

- Every line says the site's epsilon after it (server/privacy_ledger.py append_line
  computes it from the lines before it with `charged`): recomputing each one catches a
  line deleted, relabelled or edited after it was written unless every later line was
  rewritten too.
- A line with `replaces_estimate` must name an earlier no-reply estimate of the same site
  and round, not replaced before; it must be the site's report (`reported_by_site`) of a
  trained round with steps > 0, or a settling line (steps 0, `settles_with_line` N) whose
  line N lies between the estimate and it, is the site's report of that round with steps
  > 0 from the settling line's identity, replaces nothing, and settles nothing else.
- The replacing (or beside) line's identity speaks for the estimate's: the same, or a
  successor by a chain of same-site attestations in site-identities.json
  (common/site_chain.py); without that file only an estimate's own identity replaces it.
Every failure raises FedsynthError with one line naming the ledger's line.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, TypeGuard

from fedsynth.common.accountant import epsilon
from fedsynth.common.errors import FedsynthError
from fedsynth.common.ledger import charged, segment_of
from fedsynth.common.site_chain import is_identity, same_site_identities

TOLERANCE = 1e-9  # relative: the same accountant on the same history gives the same float


def _whole(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def check_history(
    ledger: list[dict], identities: dict[str, Any], delta: float, accountant: str, where: Path
) -> None:
    """Check `ledger` (read from `where`) as the module doc says, at the study's `delta`
    and `accountant`; `identities`: the run dir's site-identities.json as
    site_chain.read_identities_file reads it (empty lists when there is none)."""
    replacing = _Replacing(ledger, identities)
    for number, e in enumerate(ledger, 1):
        site = e["site"]
        replaced = e.get("replaces_estimate")
        if replaced and not replacing.allowed(number, e):
            raise FedsynthError(
                f"{where}, line {number}: replaces estimate {replaced!r}, which is not an "
                f"earlier no-reply estimate of {site} in round {e['round']} not replaced "
                "before, charged to the same identity (or one it is attested to succeed), "
                "replaced by a trained round the site reported"
            )
        segments = [segment_of(line) for line in charged(ledger[:number], site)]
        recomputed = epsilon(segments, delta, accountant)
        if not math.isclose(float(e["epsilon"]), recomputed, rel_tol=TOLERANCE, abs_tol=TOLERANCE):
            raise FedsynthError(
                f"{where}, line {number}: says {site} is at epsilon {float(e['epsilon']):.6g}, "
                f"the lines up to it give {recomputed:.6g}: the ledger was changed after it "
                "was written"
            )


class _Replacing:
    """Which lines may replace which estimates (see the module doc), in ledger order."""

    def __init__(self, ledger: list[dict], identities: dict[str, Any]) -> None:
        self.ledger = ledger
        self.identities = identities
        self.settled: set[int] = set()  # beside lines (1-based) a settling line used
        self.replaced: set[int] = set()  # estimate lines (1-based) already replaced

    def allowed(self, number: int, line: dict) -> bool:
        """Whether ledger line `number` (1-based), `line`, may replace its estimate."""
        found = [
            (at, e)
            for at, e in enumerate(self.ledger[: number - 1], 1)
            if e["site"] == line["site"]
            and e.get("estimate")
            and e["status"] == "no-reply"
            and str(e["estimate"]) == str(line["replaces_estimate"])
        ]
        if len(found) != 1 or found[0][1]["round"] != line["round"]:
            return False
        at, estimate = found[0]
        if at in self.replaced or not (
            line["status"] == "trained" and line.get("reported_by_site")
        ):
            return False
        beside_number = line.get("settles_with_line")
        if beside_number is None:
            ok = _whole(line["steps"]) and line["steps"] > 0 and self._speaks_for(line, estimate)
        else:
            ok = self._settles(number, line, at, estimate, beside_number)
        if ok:
            self.replaced.add(at)
        return ok

    def _settles(
        self, number: int, line: dict, at: int, estimate: dict, beside_number: object
    ) -> bool:
        if line["steps"] != 0 or not _whole(beside_number):
            return False
        if not at < beside_number < number or beside_number in self.settled:
            return False
        beside = self.ledger[beside_number - 1]
        ok = bool(
            beside["site"] == line["site"]
            and beside["round"] == line["round"]
            and beside["status"] == "trained"
            and beside.get("reported_by_site")
            and _whole(beside["steps"])
            and beside["steps"] > 0
            and not beside.get("replaces_estimate")
            and beside.get("identity") == line.get("identity")
            and self._speaks_for(beside, estimate)
        )
        if ok:
            self.settled.add(beside_number)
        return ok

    def _speaks_for(self, line: dict, estimate: dict) -> bool:
        """The line's identity is the estimate's, or speaks for it by attested chain."""
        if line.get("identity") == estimate.get("identity"):
            return True
        if not is_identity(line.get("identity")):
            return False
        speaks = same_site_identities(self.identities, line["site"], line["identity"])
        return estimate.get("identity") in speaks
