"""The server's privacy ledger: never below what a site really spent, on any path.

Lines (common/ledger.py format) the server writes for a site in a round:
- `trained`: the site's reply, with the (noise multiplier, sample rate, steps) it used.
- `no-reply` with `estimate: true`: the site was sent the round and no valid reply came
  back (lost, failed, malformed). The server cannot know what it spent, so it charges the
  most it could have: a segment that takes the site's epsilon to the study's target
  (`worst_case_segment`). A site never goes past the target (it refuses before), so the
  estimate is never below the truth.
- a line with `reported_by_site: true`: a round from the site's own ledger (sites record a
  round before its update leaves them, and report their history with every message) that
  the server had not charged; when the server holds an estimate for that round, the line
  carries `replaces_estimate: true` and the site's true spend takes the estimate's place.

`charged` is the one reading of which lines count; everyone who recomputes epsilon from a
server ledger (summary, selection, release) uses it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable

from fedsynth.common.accountant import Segment, epsilon
from fedsynth.common.config import Config, PrivacyConfig
from fedsynth.common.ledger import append_entry, read_ledger, segment_of, spending
from fedsynth.server.run_dir import LEDGER
from fedsynth.server.study import Study


def charged(entries: Iterable[dict], site: str) -> list[dict]:
    """The lines that count toward `site`'s epsilon: spending lines, less any estimate
    whose round the site's own report has since replaced."""
    mine = [e for e in entries if e["site"] == site]
    replaced = {int(e["round"]) for e in mine if e.get("replaces_estimate")}
    return [
        e for e in spending(mine, site) if not (e.get("estimate") and int(e["round"]) in replaced)
    ]


def charged_epsilon(entries: Iterable[dict], site: str, privacy: PrivacyConfig) -> float:
    segments = [segment_of(e) for e in charged(entries, site)]
    return epsilon(segments, privacy.delta, privacy.accountant)


def site_epsilons(ledger: list[dict], config: Config) -> dict[str, float]:
    sites = sorted({e["site"] for e in ledger})
    return {s: charged_epsilon(ledger, s, config.privacy) for s in sites}


def site_is_spent(ledger: list[dict], site: str, config: Config) -> bool:
    """The server's view: the site's charged epsilon has reached the study's target."""
    return charged_epsilon(ledger, site, config.privacy) >= config.privacy.target_epsilon


def worst_case_segment(history: list[Segment], privacy: PrivacyConfig, rate: float, steps: int):
    """The least-noise round at `rate` x `steps` that lifts `history` to the target epsilon.

    Bisection on the noise multiplier for the largest sigma whose epsilon (same accountant
    and delta) is still at or above the target; when the history alone is already there,
    sigma = 1e3 (the round then adds next to nothing, and the total is at the target).
    """

    def eps(sigma: float) -> float:
        return epsilon([*history, Segment(sigma, rate, steps)], privacy.delta, privacy.accountant)

    target = privacy.target_epsilon
    low, high = 1e-2, 1e3  # eps(low) >= target > eps(high), unless the history is there
    if eps(high) >= target:
        return Segment(high, rate, steps)
    if eps(low) < target:  # cannot happen for sane targets; charge the smallest sigma
        return Segment(low, rate, steps)
    for _ in range(40):
        mid = math.sqrt(low * high)
        if eps(mid) >= target:
            low = mid
        else:
            high = mid
    return Segment(low, rate, steps)


def append_line(
    study: Study, round_number: int, site: str, segment: Segment | None, status: str, **extra
) -> dict:
    """One server ledger line, epsilon recomputed from the site's charges plus this line."""
    privacy = study.config.privacy
    path = study.run_dir / LEDGER
    entry = {
        "round": round_number,
        "site": site,
        "noise_multiplier": segment.noise_multiplier if segment else 0.0,
        "sample_rate": segment.sample_rate if segment else 0.0,
        "steps": segment.steps if segment else 0,
        "delta": privacy.delta,
        "epsilon": 0.0,
        "accountant": privacy.accountant,
        "status": status,
        **extra,
    }
    entry["epsilon"] = charged_epsilon([*read_ledger(path), entry], site, privacy)
    append_entry(path, entry)
    return entry


def last_rate(ledger: list[dict], site: str) -> float:
    """The site's last sample rate the server knows of (1.0, the worst case, if none)."""
    rates = [float(e["sample_rate"]) for e in charged(ledger, site) if not e.get("estimate")]
    return rates[-1] if rates else 1.0


def charge_estimate(study: Study, round_number: int, site: str, **extra) -> dict:
    """Charge a site that was sent the round and gave no valid reply (see module doc)."""
    ledger = read_ledger(study.run_dir / LEDGER)
    privacy = study.config.privacy
    history = [segment_of(e) for e in charged(ledger, site)]
    rate = privacy.sample_rate or last_rate(ledger, site)
    segment = worst_case_segment(history, privacy, rate, privacy.local_steps)
    return append_line(study, round_number, site, segment, "no-reply", estimate=True, **extra)


def parse_history(text: str) -> list[tuple[int, Segment]]:
    """A site's reported history ([[round, sigma, rate, steps], ...]) checked strictly.

    Raises ValueError on anything but a list of 4 finite numbers with round >= 1,
    sigma > 0, 0 < rate <= 1 and steps >= 1 (a malformed report counts as no report).
    """
    rows = json.loads(text)
    if not isinstance(rows, list):
        raise ValueError("history is not a list")
    out = []
    for row in rows:
        if not (isinstance(row, list) and len(row) == 4):
            raise ValueError("history row is not [round, sigma, rate, steps]")
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in row):
            raise ValueError("history row holds a non-number")
        r, sigma, rate, steps = row
        if r < 1 or r != int(r) or sigma <= 0 or not 0 < rate <= 1 or steps < 1:
            raise ValueError("history row out of range")
        if steps != int(steps):
            raise ValueError("history steps not whole")
        out.append((int(r), Segment(float(sigma), float(rate), int(steps))))
    return out


def reconcile(study: Study, site: str, reported: list[tuple[int, Segment]]) -> int:
    """Charge rounds the site's own ledger holds and the server's does not; return how many.

    Matched round by round on the exact numbers. A round the server only estimated gets
    the site's true line, which replaces the estimate (`charged`).
    """
    ledger = read_ledger(study.run_dir / LEDGER)
    known: dict[int, list[Segment]] = {}
    estimated: set[int] = set()
    for e in charged(ledger, site):
        if e.get("estimate"):
            estimated.add(int(e["round"]))
        else:
            known.setdefault(int(e["round"]), []).append(segment_of(e))
    added = 0
    for r, segment in reported:
        if segment in known.get(r, []):
            known[r].remove(segment)
            continue
        extra = {"replaces_estimate": True} if r in estimated else {}
        estimated.discard(r)
        append_line(study, r, site, segment, "trained", reported_by_site=True, **extra)
        added += 1
    return added


def compare_reported(study: Study, site: str, reported: float | None) -> None:
    """Warn when a site's own epsilon differs from the server's recomputation: the ledgers
    diverged (the server's is above after an estimate, for instance). The server's figure,
    from its own ledger, is the one that counts."""
    if reported is None:
        return
    ours = charged_epsilon(read_ledger(study.run_dir / LEDGER), site, study.config.privacy)
    if not math.isclose(float(reported), ours, rel_tol=1e-6, abs_tol=1e-9):
        print(
            f"[fedsynth] warning: {site} reports epsilon {float(reported):.6g}, the server's "
            f"ledger gives {ours:.6g}; the server's figure counts",
            flush=True,
        )
