"""Studies on phantom sites, each one function of the config (`fedsynth study NAME`).

Every study runs on the simulation's own data (simulations/study_data.py: the phantom
sites `flwr run .` trains on, its public checkpoint, held-out subjects of each site's
profile) and measures with the simulation-only site-domain loss (server/validation.py).
Results are plain dicts (JSON) with the figures a table needs; `dp_gap_table` and
`plot_dp_gap` show them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedsynth.common.checkpoint import load_pretrained
from fedsynth.common.config import Config, to_dict
from fedsynth.server.study import DEFAULT_PHANTOM_SUBJECTS, cache_dir
from fedsynth.server.validation import SiteDomain
from fedsynth.simulations.federated import federate, load_sites
from fedsynth.simulations.study_data import simulated_data


@dataclass(frozen=True)
class StudySetup:
    """What a study is run with: the config, phantom site size and seeds."""

    config: Config
    subjects: int = DEFAULT_PHANTOM_SUBJECTS
    seeds: tuple[int, ...] = (0,)


def _share(public: float, private: float, reference: float) -> float:
    """The part of the non-private gain DP recovers: (public - DP) / (public - non-private)."""
    gap = public - reference
    return (public - private) / gap if gap > 0 else math.nan


def dp_gap(setup: StudySetup) -> dict:
    """Federated DP finetuning against the same steps without noise, per site.

    For each seed: the study's rounds with DP-SGD (noise planned for the target epsilon)
    and the same rounds with noise 0, from the public checkpoint; each site's held-out
    site-profile loss after every round. share = (public - DP) / (public - non-private):
    1 means DP lost nothing, 0 that the sites' data did not move the model.
    """
    config = setup.config
    started = time.perf_counter()
    cache = cache_dir(config)
    data = simulated_data(config, cache, setup.subjects)
    pretrained = load_pretrained(data.checkpoint)
    names = [f"site-{k}" for k in range(1, config.federation.sites + 1)]
    sites = load_sites(
        pretrained, data.phantoms, names, cache / "studies" / "sites" / data.phantoms.name
    )
    check = SiteDomain(pretrained, data.site_domain, config).loss
    start = {k: v.clone() for k, v in pretrained.unet.state_dict().items()}
    runs = []
    for seed in setup.seeds:
        arms = {}
        for arm, private in (("dp", True), ("nonprivate", False)):
            run = federate(
                config, start, pretrained.unet, sites, private=private, evaluate=check,
                seed=seed, label=f"dp-gap seed {seed} {arm}: ",
            )  # fmt: skip
            arms[arm] = {"loss": run.history, "noise": run.noise, "seconds": run.seconds}
        public, dp, reference = (
            arms["dp"]["loss"][0], arms["dp"]["loss"][-1], arms["nonprivate"]["loss"][-1]
        )  # fmt: skip
        share = {s: _share(public[s], dp[s], reference[s]) for s in public}
        overall = _share(*(sum(v.values()) / len(v) for v in (public, dp, reference)))
        runs.append({"seed": seed, **arms, "share": share, "share_of_mean_loss": overall})
    return {
        "study": "dp-gap",
        "subjects_per_site": setup.subjects,
        "config": to_dict(config),
        "runs": runs,
        "share_of_mean_loss": [r["share_of_mean_loss"] for r in runs],
        "mean_site_share": [sum(r["share"].values()) / len(r["share"]) for r in runs],
        "seconds": time.perf_counter() - started,
    }


STUDIES: dict[str, Callable[[StudySetup], dict]] = {"dp-gap": dp_gap}


def dp_gap_table(result: dict) -> str:
    """Per site and seed: public checkpoint, DP, non-private loss and the share; then the
    share of the gap in the sites' mean loss and the mean of the sites' shares, per seed."""
    lines = [
        "site-domain loss (simulation only; held-out subjects of each site's profile)",
        f"{'seed':>4}  {'site':<8} {'public':>8} {'DP':>8} {'non-DP':>8} {'share':>6}",
    ]
    for run in result["runs"]:
        public, dp, ref = run["dp"]["loss"][0], run["dp"]["loss"][-1], run["nonprivate"]["loss"][-1]
        for site, share in run["share"].items():
            lines.append(
                f"{run['seed']:>4}  {site:<8} {public[site]:>8.4f} {dp[site]:>8.4f} "
                f"{ref[site]:>8.4f} {share:>6.0%}"
            )
    for key, text in (("share_of_mean_loss", "of the sites' mean loss gap"),
                      ("mean_site_share", "mean of the sites' shares")):  # fmt: skip
        lines.append(f"DP keeps {', '.join(f'{v:.0%}' for v in result[key])} {text} (per seed)")
    return "\n".join(lines)


def plot_dp_gap(result: dict, png: Path) -> None:
    """Site-domain loss per round, DP against non-private, one panel per site."""
    from matplotlib.figure import Figure

    first = result["runs"][0]
    sites = [s for s in first["share"]]
    fig = Figure(figsize=(3.2 * len(sites), 3.0), dpi=120, layout="constrained")
    axes = fig.subplots(1, len(sites), squeeze=False)[0]
    for ax, site in zip(axes, sites, strict=True):
        for run in result["runs"]:
            for arm, colour, name in (("dp", "C0", "DP-SGD"), ("nonprivate", "C1", "no noise")):
                values = [entry[site] for entry in run[arm]["loss"]]
                label = name if run is first else None
                ax.plot(range(len(values)), values, color=colour, marker="o", ms=3, label=label)
        ax.set_title(f"{site} (mean share {_mean(result, site):.0%})", fontsize=9)
        ax.set_xlabel("round (0: public checkpoint)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out site-profile loss")
    axes[0].legend(fontsize=8)
    fig.savefig(png)


def _mean(result: dict, site: str) -> float:
    values = [run["share"][site] for run in result["runs"]]
    return sum(values) / len(values)
