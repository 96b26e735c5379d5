"""Simulation only: a simulation's non-private ceiling, summarised where its `flwr run` finds it.

The ceiling (simulations/ceiling.py: the public checkpoint finetuned without privacy on
every site's pooled subjects) takes minutes to hours of CPU, too slow for the quick
start, so `fedsynth study dp-gap` computes it and `StudyContext.ceiling` writes a small
public summary of each seed's run next to the held-out subjects (as
SiteDomain.public_fidelity keeps its figures): per site the site-domain loss of the public
checkpoint and of the best check, and the best step. A `flwr run .` simulation's
end-of-study summary reads it and states the study's share of the ceiling's gain.

A summary is found only for the same simulation: it is keyed by what the ceiling depends
on and the server knows (SiteDomain.ceiling_summaries): the public UNet's SHA-256, the
phantom sites' and held-out folders, the pretraining config (the ceiling trains as
pretraining does; the privacy and federation settings do not touch it), the ceiling's
plan and the site-domain draws. Phantom data only: nothing here exists for real sites.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from fedsynth.common.io import PUBLIC_MODE, atomic_write_text

log = logging.getLogger(__name__)

COMMAND = "fedsynth study dp-gap"  # what computes the ceiling (once per simulation, cached)
MEAN = "mean"  # the sites' mean site-domain loss, next to the site names
FIELDS = ("seed", "best_step", "best", "public")  # what a summary must hold to be read


@dataclass(frozen=True)
class CeilingSummaries:
    """The ceiling summaries of one simulation: `folder` (its held-out subjects), one file
    per seed, each holding `facts` (what it is keyed by) to be read back only by a lookup
    with the same facts."""

    folder: Path
    facts: dict

    @property
    def key(self) -> str:
        blob = json.dumps(self.facts, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def path(self, seed: int) -> Path:
        return self.folder / f".ceiling-{self.key}-seed{seed}.json"

    def write(self, seed: int, result: dict) -> None:
        """Summarise `result` (finetune_ceiling's: "checks" from step 0, "best_step",
        "best") of training seed `seed` (public: phantom figures only)."""
        summary = {
            "keyed_by": self.facts,
            "seed": seed,
            "best_step": result["best_step"],
            "best": result["best"],
            "public": result["checks"][0]["loss"],
            "plan": result["plan"],
        }
        atomic_write_text(self.path(seed), json.dumps(summary, indent=1) + "\n", PUBLIC_MODE)

    def read(self) -> list[dict]:
        """Every seed's summary of this simulation's ceiling, by seed ([] when none). A
        file that is not one (unreadable, or lacking a figure) is passed over with one
        warning: the study it would inform has ended and is saved; the study that
        computes the ceiling writes it again."""
        found = []
        for path in self.folder.glob(f".ceiling-{self.key}-seed*.json"):
            try:
                summary = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
                log.warning("%s: not a ceiling summary (%s), passed over", path, error)
                continue
            if not isinstance(summary, dict) or summary.get("keyed_by") != self.facts:
                continue
            missing = [field for field in FIELDS if field not in summary]
            if missing:
                log.warning("%s: a ceiling summary without %s, passed over", path, missing[0])
                continue
            found.append(summary)
        return sorted(found, key=lambda s: s["seed"])


def _mean(losses: dict[str, float]) -> float:
    return sum(losses.values()) / len(losses)


def _ratio(gain: float, ceiling_gain: float) -> float | None:
    """gain / ceiling_gain; None when the ceiling gained nothing (no share to state)."""
    return gain / ceiling_gain if ceiling_gain > 0 else None


def _percent(share: float | None) -> str:
    return "n/a (the ceiling did not gain)" if share is None else f"{100 * share:.0f}%"


def share_of_ceiling(
    summaries: list[dict], public: dict[str, float], final: dict[str, float]
) -> dict:
    """The study's share of the ceiling's gain in site-domain loss, per site and on the
    sites' mean (MEAN): (public - final) / (ceiling's public - ceiling's best), each gain
    measured by the run that made it; over several ceiling seeds, their mean gain. 1: the
    study gained what the sites' data offers without privacy; 0: nothing. `public`, `final`:
    the study's site-domain loss per site at round 0 and its last round. Returns {"share",
    "study_gain", "ceiling_gain", "ceiling": {"seeds", "best_step", "best"}, "note": the
    line to log}; with no summary, {"share": None, "note": how to compute the ceiling}."""
    if not summaries:
        return {
            "share": None,
            "note": "share of the non-private ceiling's gain (simulation only): needs the "
            "ceiling of this simulation (the public checkpoint finetuned without privacy "
            f"on the sites' pooled subjects); `{COMMAND}` computes it, once per simulation "
            "(cached), with this run's --config, phantom subjects (--subjects, "
            "--public-subjects) and cache dir",
        }
    sites = list(public)
    study = {site: public[site] - final[site] for site in sites}
    study[MEAN] = _mean(public) - _mean(final)
    ceiling = {
        site: sum(s["public"][site] - s["best"][site] for s in summaries) / len(summaries)
        for site in sites
    }
    ceiling[MEAN] = sum(ceiling.values()) / len(sites)
    share = {name: _ratio(study[name], ceiling[name]) for name in study}
    seeds = [s["seed"] for s in summaries]
    steps = [s["best_step"] for s in summaries]
    best = sum(_mean(s["best"]) for s in summaries) / len(summaries)
    if len(summaries) == 1:
        reached = f"ceiling {best:.4f} at step {steps[0]} (seed {seeds[0]})"
    else:
        listed = ", ".join(f"{s['best_step']} (seed {s['seed']})" for s in summaries)
        reached = f"ceiling {best:.4f} (mean of seeds, best at steps {listed})"
    per_site = ", ".join(f"{site} {_percent(share[site])}" for site in sites)
    note = (
        "share of the non-private ceiling's gain in site-domain loss (simulation only): "
        f"mean {_percent(share[MEAN])} (mean loss: public checkpoint {_mean(public):.4f}, "
        f"study {_mean(final):.4f}, {reached}); {per_site}"
    )
    return {
        "share": share,
        "study_gain": study,
        "ceiling_gain": ceiling,
        "ceiling": {"seeds": seeds, "best_step": steps, "best": [s["best"] for s in summaries]},
        "note": note,
    }
