"""Tables (text) and figures (PNG, matplotlib) of the studies' results (simulations/studies.py).

Every table lists each seed's figures; every figure plots the mean over seeds with the
range over seeds as error bars where there is more than one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

LOSS_NOTE = "site-domain loss (simulation only; held-out subjects of each site's profile)"


def _level(epsilon: float | None) -> str:
    return "no noise" if epsilon is None else f"eps {epsilon:g}"


def _spread(values: Sequence[float]) -> tuple[float, list[float]]:
    """Mean and [below, above] distances to the smallest and largest value."""
    mean = sum(values) / len(values)
    return mean, [mean - min(values), max(values) - mean]


def _seed_rows(result: dict):
    """(seed, row) for every row of every seed's run."""
    return ((run["seed"], row) for run in result["runs"] for row in run["rows"])


def _figure(panels: int, width: float = 3.6, height: float = 3.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * panels, height), dpi=120, layout="constrained")
    return fig, fig.subplots(1, panels, squeeze=False)[0]


def _bars(ax, groups: list[str], series: dict[str, list[list[float]]]) -> None:
    """Grouped bars: series name -> per group the values over seeds (mean, range)."""
    width = 0.8 / len(series)
    for k, (name, per_group) in enumerate(series.items()):
        stats = [_spread(values) for values in per_group]
        xs = [g + (k - (len(series) - 1) / 2) * width for g in range(len(groups))]
        errors = list(zip(*(s[1] for s in stats), strict=True))
        ax.bar(xs, [s[0] for s in stats], width, yerr=errors, label=name, capsize=2)
    ax.set_xticks(range(len(groups)), groups)
    ax.grid(axis="y", alpha=0.3)


# ---------------------------------------------------------------------------------- dp-gap


def dp_gap_table(result: dict) -> str:
    """Per site and seed: public checkpoint, DP, same-steps non-private and ceiling loss
    with the DP share of each gain; then both shares of the sites' mean loss and the mean
    of the sites' shares, per seed; then the fidelity of samples (mean and sd over
    sampling seeds) of the public checkpoint, DP and ceiling."""
    lines = [
        LOSS_NOTE,
        f"{'seed':>4}  {'site':<8} {'public':>8} {'DP':>8} {'non-DP':>8} {'share':>6} "
        f"{'ceiling':>8} {'c-share':>8}",
    ]
    for run in result["runs"]:
        public, dp, ref = run["dp"]["loss"][0], run["dp"]["loss"][-1], run["nonprivate"]["loss"][-1]
        best = run["ceiling"]["best"]
        for site, share in run["share"].items():
            lines.append(
                f"{run['seed']:>4}  {site:<8} {public[site]:>8.4f} {dp[site]:>8.4f} "
                f"{ref[site]:>8.4f} {share:>6.0%} {best[site]:>8.4f} "
                f"{run['ceiling_share'][site]:>8.0%}"
            )
    lines.append(
        "non-DP: the same steps without noise; ceiling: every UNet weight on the pooled "
        f"sites without privacy (one finetune, seed {result['seeds'][0]}), best held-out "
        f"check at step {result['ceiling_best_step']} of at most "
        f"{result['ceiling_plan']['max_steps']}"
    )
    for key, text in (
        ("share_of_mean_loss", "of the sites' mean loss gap to the same steps without noise"),
        ("mean_site_share", "mean of the sites' shares of that gap"),
        ("ceiling_share_of_mean_loss", "of the ceiling's gain in the sites' mean loss"),
        ("mean_site_ceiling_share", "mean of the sites' shares of the ceiling's gain"),
    ):
        lines.append(f"DP keeps {', '.join(f'{v:.0%}' for v in result[key])} {text} (per seed)")
    lines += _fidelity_lines(result["fidelity"])
    return "\n".join(lines)


FIDELITY_MODELS = {"public": "public", "dp": "DP", "ceiling": "ceiling"}


def _fidelity_lines(fidelity: dict) -> list[str]:
    volumes = sorted(set(fidelity["volumes_per_site"].values()))
    lines = [
        f"Frechet distance of samples to each site's held-out volumes ("
        f"{'/'.join(map(str, volumes))} per site, one sample each), mean +- sd over sampling "
        f"seeds {fidelity['sampling_seeds']}; DP and ceiling of seed {fidelity['models_of_seed']}",
        f"{'site':<8} {'features':<8}"
        + "".join(f"{name:>19}" for name in FIDELITY_MODELS.values()),
    ]
    for site in fidelity["public"]:
        for metric, features in (("frechet_3d", "3D"), ("frechet_2d", "slices")):
            cells = [fidelity[model][site][metric] for model in FIDELITY_MODELS]
            lines.append(
                f"{site:<8} {features:<8}"
                + "".join(f"{c['mean']:>9.4f} +- {c['sd']:<6.4f}" for c in cells)
            )
    return lines


def plot_dp_gap(result: dict, png: Path) -> None:
    """Per site: site-domain loss per round, DP against the same steps without noise, the
    ceiling's best check as a dotted line; then the ceiling's mean loss per training step
    against the DP and non-private finals; then the 3D Frechet distance of samples per
    site for the public checkpoint, DP and ceiling (error bars: sd over sampling seeds)."""
    first = result["runs"][0]
    sites = list(first["share"])
    fig, axes = _figure(len(sites) + 2, 3.2)
    for ax, site in zip(axes, sites, strict=False):
        for run in result["runs"]:
            label = run is first
            for arm, colour, name in (("dp", "C0", "DP-SGD"), ("nonprivate", "C1", "no noise")):
                values = [entry[site] for entry in run[arm]["loss"]]
                ax.plot(
                    range(len(values)),
                    values,
                    color=colour,
                    marker="o",
                    ms=3,
                    label=name if label else None,
                )
            ax.axhline(
                run["ceiling"]["best"][site],
                color="C2",
                ls=":",
                label="ceiling (best check)" if label else None,
            )
        share = _spread([run["ceiling_share"][site] for run in result["runs"]])[0]
        ax.set_title(f"{site} (DP: {share:.0%} of the ceiling's gain)", fontsize=9)
        ax.set_xlabel("round (0: public checkpoint)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out site-profile loss")
    axes[0].legend(fontsize=7)
    ceiling_ax, fidelity_ax = axes[len(sites)], axes[len(sites) + 1]
    for run in result["runs"]:
        label = run is first
        checks = run["ceiling"]["checks"]
        ceiling_ax.plot(
            [c["step"] for c in checks],
            [_mean_loss(c["loss"]) for c in checks],
            color="C2",
            marker="o",
            ms=3,
            label="ceiling" if label else None,
        )
        for arm, colour, name in (("dp", "C0", "DP final"), ("nonprivate", "C1", "no noise final")):
            ceiling_ax.axhline(
                _mean_loss(run[arm]["loss"][-1]),
                color=colour,
                ls="--",
                label=name if label else None,
            )
    ceiling_ax.set_xlabel("ceiling training step (0: public checkpoint)")
    ceiling_ax.set_title("mean over sites: the ceiling's checks", fontsize=9)
    ceiling_ax.grid(alpha=0.3)
    ceiling_ax.legend(fontsize=7)
    fidelity = result["fidelity"]
    groups = [*sites, "mean"]
    width = 0.8 / len(FIDELITY_MODELS)
    for k, (model, name) in enumerate(FIDELITY_MODELS.items()):
        cells = [fidelity[model][g]["frechet_3d"] for g in groups]
        xs = [g + (k - (len(FIDELITY_MODELS) - 1) / 2) * width for g in range(len(groups))]
        fidelity_ax.bar(
            xs, [c["mean"] for c in cells], width, yerr=[c["sd"] for c in cells], label=name
        )
    fidelity_ax.set_xticks(range(len(groups)), groups)
    fidelity_ax.set_ylabel("Frechet distance to held-out (3D)")
    fidelity_ax.set_title(
        f"seed {fidelity['models_of_seed']}'s models; bars: sd over sampling", fontsize=9
    )
    fidelity_ax.grid(axis="y", alpha=0.3)
    fidelity_ax.legend(fontsize=7)
    fig.savefig(png)


def _mean_loss(losses: dict[str, float]) -> float:
    return sum(losses.values()) / len(losses)


# ------------------------------------------------------------------------------ federation


def _server_rate(result: dict) -> str:
    """A title suffix naming the study's server optimiser and rate when they are not
    FedAvg's (sgd at 1)."""
    federation = result["config"]["federation"]
    rate = federation.get("server-learning-rate", 1.0)
    if federation.get("server-optimizer", "sgd") == "adam":
        return f", server optimiser FedAdam at rate {rate:g}"
    return "" if rate == 1.0 else f", server learning rate {rate:g}"


def federation_table(result: dict) -> str:
    first = result["runs"][0]
    columns = [c for c in first["public"]]
    lines = [
        f"{LOSS_NOTE}; every arm at epsilon {result['epsilon']:g} per subject"
        + _server_rate(result),
        f"{'seed':>4}  {'model':<16}" + "".join(f"{c:>9}" for c in columns),
    ]
    for run in result["runs"]:
        for label, losses in (("public checkpoint", run["public"]), *run["final"].items()):
            lines.append(
                f"{run['seed']:>4}  {label:<16}" + "".join(f"{losses[c]:>9.4f}" for c in columns)
            )
        verdict = "beats" if run["federated_beats_every_site"] else "does NOT beat"
        lines.append(f"      federated {verdict} every single site on the mean loss")
    return "\n".join(lines)


def plot_federation(result: dict, png: Path) -> None:
    """Per evaluation site (and their mean): how far each arm lowered the loss from the
    public checkpoint's."""
    runs = result["runs"]
    groups = list(runs[0]["public"])
    models = list(runs[0]["final"])
    series = {
        m: [[r["public"][g] - r["final"][m][g] for r in runs] for g in groups] for m in models
    }
    fig, (ax,) = _figure(1, 7.5, 3.4)
    _bars(ax, groups, series)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("drop of the held-out site-profile loss")
    ax.set_title(
        f"each site alone vs federated vs pooled, epsilon {result['epsilon']:g}"
        + _server_rate(result),
        fontsize=9,
    )
    ax.legend(fontsize=7, ncols=2)
    fig.savefig(png)


# ----------------------------------------------------------------------------- pretraining


def pretraining_table(result: dict) -> str:
    lines = [
        f"{LOSS_NOTE}, mean over sites",
        f"{'seed':>4}  {'privacy':<9} {'public: start':>14} {'-> finetuned':>13} "
        f"{'scratch: start':>15} {'-> trained':>11} {'scratch/public':>15}",
    ]
    for seed, row in _seed_rows(result):
        public, scratch = row["public"], row["scratch"]
        lines.append(
            f"{seed:>4}  {_level(row['epsilon']):<9} {public['start']:>14.4f} "
            f"{public['mean']:>13.4f} {scratch['start']:>15.4f} {scratch['mean']:>11.4f} "
            f"{scratch['mean'] / public['mean']:>14.2f}x"
        )
    return "\n".join(lines)


def plot_pretraining(result: dict, png: Path) -> None:
    runs = result["runs"]
    levels = [_level(row["epsilon"]) for row in runs[0]["rows"]]
    series = {
        f"{name} start, finetuned": [
            [r["rows"][i][key]["mean"] for r in runs] for i in range(len(levels))
        ]
        for name, key in (("public", "public"), ("random", "scratch"))
    }
    fig, (ax,) = _figure(1, 5.5, 3.2)
    _bars(ax, levels, series)
    first = runs[0]["rows"][0]
    for key, colour in (("public", "C0"), ("scratch", "C1")):  # where each arm started
        ax.axhline(first[key]["start"], color=colour, ls="--", lw=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("held-out site-profile loss (log)")
    ax.set_title("public pretraining vs training from scratch (dashed: before)", fontsize=9)
    ax.legend(fontsize=8)
    fig.savefig(png)


# ------------------------------------------------------------------------------- trainable


def _kept(share: float) -> float:
    """A subset's share, or nan where its noiseless run gained less than its DP run: that
    run is then no upper bound, and a share of it says nothing."""
    return share if share <= 1.0 else math.nan


def _percent(share: float, width: int) -> str:
    return f"{'n/a':>{width}}" if math.isnan(share) else f"{share:>{width}.0%}"


def trainable_table(result: dict) -> str:
    lines = [
        f"{LOSS_NOTE}, mean over sites; share: the part of the subset's own non-private gain kept",
        f"{'seed':>4}  {'trained':<10} {'weights':>9} {'lr':>8} {'public':>8} {'eps 1':>8} "
        f"{'eps 10':>8} {'no noise':>9} {'share 1':>8} {'share 10':>9}",
    ]
    for seed, row in _seed_rows(result):
        loss, share = row["loss"], row["share"]
        lines.append(
            f"{seed:>4}  {row['trainable']:<10} {row['weights']:>9} {row['learning_rate']:>8.2g} "
            f"{row['public']:>8.4f} {loss['1']:>8.4f} "
            f"{loss['10']:>8.4f} {loss['none']:>9.4f} {_percent(_kept(share['1']), 8)} "
            f"{_percent(_kept(share['10']), 9)}"
        )
    return "\n".join(lines)


def plot_trainable(result: dict, png: Path) -> None:
    runs = result["runs"]
    subsets = [row["trainable"] for row in runs[0]["rows"]]
    fig, axes = _figure(2, 3.8)
    drop = {
        level: [
            [r["rows"][i]["public"] - r["rows"][i]["loss"][key] for r in runs]
            for i in range(len(subsets))
        ]
        for level, key in (("eps 1", "1"), ("eps 10", "10"), ("no noise", "none"))
    }
    _bars(axes[0], subsets, drop)
    axes[0].set_ylabel("drop of the mean site-domain loss")
    axes[0].legend(fontsize=8)
    share = {
        level: [[_kept(r["rows"][i]["share"][key]) for r in runs] for i in range(len(subsets))]
        for level, key in (("eps 1", "1"), ("eps 10", "10"))
    }
    _bars(axes[1], subsets, share)
    for g in range(len(subsets)):
        if all(math.isnan(v) for values in share.values() for v in values[g]):
            axes[1].text(g, 0.02, "n/a: no noise\ngained less", ha="center", fontsize=8)
    axes[1].set_ylabel("share of the non-private gain kept")
    for ax in axes:
        ax.set_xlabel("trained under DP-SGD")
    fig.suptitle("what DP-SGD trains", fontsize=9)
    fig.savefig(png)


# ------------------------------------------------------------------------- controllability


def controllability_table(result: dict) -> str:
    lines = [
        "requested vs measured cavity volume (volume meter), every held-out volume of every site",
        f"{'seed':>4}  {'model':<18} {'LV r':>6} {'LV MAE':>7} {'RV r':>6} {'RV MAE':>7}"
        f" {'loss':>8}",
    ]

    def line(seed: str, label: str, m: dict, loss: float | None) -> str:
        tail = f"{loss:>8.4f}" if loss is not None else f"{'':>8}"
        return (
            f"{seed:>4}  {label:<18} {m['lv']['pearson_r']:>6.2f} {m['lv']['mae_ml']:>7.1f} "
            f"{m['rv']['pearson_r']:>6.2f} {m['rv']['mae_ml']:>7.1f} {tail}"
        )

    lines.append(line("", "real volumes", result["real"], None))
    lines.append(line("", "public checkpoint", result["public"], None))
    for seed, row in _seed_rows(result):
        lines.append(line(str(seed), _level(row["epsilon"]), row, row["loss"]))
    lines.append("MAE in mL; real volumes: the meter's own error, the floor for every model")
    return "\n".join(lines)


def plot_controllability(result: dict, png: Path) -> None:
    runs = result["runs"]
    levels = [_level(row["epsilon"]) for row in runs[0]["rows"]]
    fig, axes = _figure(2, 3.8)
    for ax, key, name in ((axes[0], "pearson_r", "Pearson r"), (axes[1], "mae_ml", "MAE (mL)")):
        for side, colour in (("lv", "C0"), ("rv", "C1")):
            stats = [_spread([r["rows"][i][side][key] for r in runs]) for i in range(len(levels))]
            errors = list(zip(*(s[1] for s in stats), strict=True))
            ax.errorbar(
                range(len(levels)),
                [s[0] for s in stats],
                yerr=errors,
                color=colour,
                marker="o",
                capsize=2,
                label=f"{side.upper()} sampled",
            )
            ax.axhline(result["public"][side][key], color=colour, ls="--", lw=0.8)
            ax.axhline(result["real"][side][key], color=colour, ls=":", lw=0.8)
        ax.set_xticks(range(len(levels)), levels)
        ax.set_ylabel(f"requested vs measured, {name}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, title="dashed: public checkpoint; dotted: real", title_fontsize=7)
    fig.suptitle("controllability of the cavity volumes against epsilon", fontsize=9)
    fig.savefig(png)


# ----------------------------------------------------------------------------------- scale


def scale_table(result: dict) -> str:
    lines = [
        f"{LOSS_NOTE}, mean over sites; every site at epsilon {result['epsilon']:g}",
        f"{'seed':>4}  {'sites':>5} {'subjects/site':>14} {'noise mult.':>12} {'loss':>8}"
        f" {'drop':>8}",
    ]
    for seed, row in _seed_rows(result):
        noise = max(row["noise"].values())
        lines.append(
            f"{seed:>4}  {row['sites']:>5} {row['subjects_per_site']:>14} {noise:>12.3f} "
            f"{row['loss']:>8.4f} {row['public'] - row['loss']:>8.4f}"
        )
    return "\n".join(lines)


def plot_scale(result: dict, png: Path) -> None:
    runs = result["runs"]
    rows = runs[0]["rows"]
    full = max(r["subjects_per_site"] for r in rows)
    most = max(r["sites"] for r in rows)
    fig, axes = _figure(2, 3.6)
    for ax, pick, x, name in (
        (
            axes[0],
            lambda r: r["sites"] == most,
            "subjects_per_site",
            f"subjects per site ({most} sites)",
        ),
        (
            axes[1],
            lambda r: r["subjects_per_site"] == full,
            "sites",
            f"sites ({full} subjects each)",
        ),
    ):
        chosen = sorted((i for i, r in enumerate(rows) if pick(r)), key=lambda i: rows[i][x])
        stats = [
            _spread([run["rows"][i]["public"] - run["rows"][i]["loss"] for run in runs])
            for i in chosen
        ]
        errors = list(zip(*(s[1] for s in stats), strict=True))
        ax.errorbar(
            [rows[i][x] for i in chosen], [s[0] for s in stats], yerr=errors, marker="o", capsize=2
        )
        ax.set_xticks([rows[i][x] for i in chosen])
        ax.set_xlabel(name)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("drop of the mean site-domain loss")
    fig.suptitle(
        f"utility against site size and number of sites, epsilon {result['epsilon']:g}", fontsize=9
    )
    fig.savefig(png)


# ------------------------------------------------------------------------------ downstream


def downstream_table(result: dict) -> str:
    lines = [
        f"LV cavity regressor tested on {result['test_volumes']} held-out volumes of every site; "
        f"real: {result['scarce_subjects_per_site']} subjects per site ({result['real_volumes']} "
        f"volumes); synthetic: {result['synthetic_volumes']} volumes",
        f"{'seed':>4}  {'trained on':<44} {'MAE (mL)':>9} {'r':>6}",
    ]
    for run in result["runs"]:
        for label, measured in run["results"].items():
            lines.append(
                f"{run['seed']:>4}  {label:<44} {measured['mae_ml']:>9.1f} "
                f"{measured['pearson_r']:>6.2f}"
            )
    return "\n".join(lines)


def plot_downstream(result: dict, png: Path) -> None:
    runs = result["runs"]
    labels = list(runs[0]["results"])
    fig, axes = _figure(2, 4.4, 0.45 * len(labels) + 1.2)
    for ax, key, name in (
        (axes[0], "mae_ml", "MAE (mL), lower is better"),
        (axes[1], "pearson_r", "Pearson r, higher is better"),
    ):
        stats = [_spread([r["results"][label][key] for r in runs]) for label in labels]
        errors = list(zip(*(s[1] for s in stats), strict=True))
        ax.barh(range(len(labels)), [s[0] for s in stats], xerr=errors, capsize=2, color="C0")
        ax.set_yticks(range(len(labels)), labels if ax is axes[0] else [], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(name)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(
        f"LV cavity regression with {result['scarce_subjects_per_site']} real subjects per site: "
        "does synthetic pretraining help?",
        fontsize=9,
    )
    fig.savefig(png)


def levers_table(result: dict) -> str:
    """Per seed and lever: the sites' mean loss, its share of the ceiling's gain and the
    DP-SGD seconds; then the ceiling and the public-only training."""
    ceiling, public_only = result["ceiling"], result["public_only"]
    lines = [
        f"{LOSS_NOTE}, mean over sites; every lever at epsilon {result['epsilon']:g}",
        f"ceiling {ceiling['loss']:.4f} (step {ceiling['best_step']}); public data only, "
        f"trained on as the ceiling is: {public_only['loss']:.4f} (step "
        f"{public_only['best_step']}), {public_only['ceiling_share']:.0%} of the ceiling's gain",
        f"{'seed':>4}  {'lever':<44} {'public':>8} {'loss':>8} {'c-share':>8} {'DP s':>6}",
    ]
    for seed, row in _seed_rows(result):
        lines.append(
            f"{seed:>4}  {row['lever']:<44} {row['public']:>8.4f} {row['loss']:>8.4f} "
            f"{row['ceiling_share']:>8.0%} {row['seconds']:>6.0f}"
        )
    return "\n".join(lines)


def plot_levers(result: dict, png: Path) -> None:
    """Each lever's share of the ceiling's gain (mean over seeds, range as error bars)."""
    names = [row["lever"] for row in result["runs"][0]["rows"]]
    shares = {
        name: [100 * r["ceiling_share"] for _, r in _seed_rows(result) if r["lever"] == name]
        for name in names
    }
    fig, (ax,) = _figure(1, 7.0, 3.4)
    _bars(ax, [n.split(" (")[0] for n in names], {"DP-SGD": list(shares.values())})
    ax.axhline(
        100 * result["public_only"]["ceiling_share"], ls=":", c="k", label="public data only"
    )
    ax.set_ylabel("% of the ceiling's gain")
    ax.tick_params(axis="x", labelrotation=20)
    ax.legend(fontsize=8)
    fig.savefig(png)


def dp_audit_table(result: dict) -> str:
    """The audit's claim, bound, counts and power, one line per run."""
    lines = [
        f"one-run DP audit, {result['canaries']} canaries, noise {result['noise']}; "
        f"claimed epsilon {result['epsilon_claimed']:g} (delta {result['delta']:g})",
        f"the most this audit can show (every guess right): epsilon >= "
        f"{result['largest_certifiable']:.2f} at {result['confidence']:.0%} confidence",
        f"{'seed':>4} {'in':>5} {'guesses':>8} {'right':>6} {'abstained':>10} {'AUC':>6} "
        f"{'eps >=':>7}",
    ]
    for run in (result, *result["repeats"]):
        lines.append(
            f"{run['seed']:>4} {run['included']:>5} {run['guesses']:>8} {run['correct']:>6} "
            f"{run['abstained']:>10} {run['auc']:>6.3f} {run['epsilon_lower_bound']:>7.3f}"
        )
    return "\n".join(lines)


def plot_dp_audit(result: dict, png: Path) -> None:
    """The canaries' scores (loss fall from the public checkpoint to the final model),
    members against non-members, of the first run."""
    fig, (ax,) = _figure(1, 6.0, 3.4)
    inside, outside = result["scores_in"], result["scores_out"]
    import numpy as np

    bins = np.histogram_bin_edges(inside + outside, bins=30)  # one set of bins for both
    ax.hist(outside, bins=bins, alpha=0.6, label=f"not trained on ({len(outside)})")
    ax.hist(inside, bins=bins, alpha=0.6, label=f"trained on ({len(inside)})")
    ax.set_xlabel("canary score: how far its weight moved the way the canary pushes it")
    ax.set_ylabel("canaries")
    ax.set_title(
        f"{result['correct']} of {result['guesses']} guesses right: epsilon >= "
        f"{result['epsilon_lower_bound']:.2f} (claimed {result['epsilon_claimed']:g})",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.savefig(png)


def signal_table(result: dict) -> str:
    """Per seed: one step's signal-to-noise and the two batches' cosine by draws and band,
    per weight set; then the cosines between the populations' mean gradients."""
    subsets = list(result["weights"])
    lines = [
        f"one DP-SGD step at {result['site']} at the public checkpoint: two batches of "
        f"{result['batch']} subjects, noise multiplier {result['noise_multiplier']:.2f}; "
        "signal-to-noise (the two batches' cosine)",
        f"{'seed':>4} {'draws':>5} {'timesteps':>10} "
        + " ".join(f"{s + ' (' + format(result['weights'][s], ',') + ')':>24}" for s in subsets),
    ]
    for run in result["runs"]:
        for step in run["steps"]:
            band = f"{step['band'][0]}-{step['band'][1]}"
            cells = " ".join(
                f"{step['snr'][s]:>15.4f} ({step['batch_cosine'][s]:5.2f})" for s in subsets
            )
            lines.append(f"{run['seed']:>4} {step['draws']:>5} {band:>10} {cells}")
        names = list(run["cosines"])
        lines.append(f"seed {run['seed']}: cosines between mean clipped gradients (all weights)")
        lines.append(" " * 8 + "".join(f"{n:>9}" for n in names))
        for a in names:
            lines.append(f"{a:>8}" + "".join(f"{run['cosines'][a][b]:>9.2f}" for b in names))
    return "\n".join(lines)


def plot_signal(result: dict, png: Path) -> None:
    """One step's signal-to-noise by draws and timestep band (first seed), per weight set;
    and the cosines between the populations' mean gradients."""
    run = result["runs"][0]
    fig, (left, right) = _figure(2, 4.6, 3.6)
    labels = [f"{s['draws']}x {s['band'][0]}-{s['band'][1]}" for s in run["steps"]]
    _bars(
        left,
        labels,
        {name: [[s["snr"][name]] for s in run["steps"]] for name in result["weights"]},
    )
    left.set_ylabel("signal / noise norm, one step")
    left.set_xlabel("draws per volume, timesteps")
    left.tick_params(axis="x", labelrotation=45, labelsize=7)
    left.legend(fontsize=8, loc="upper left")
    names = list(run["cosines"])
    matrix = [[run["cosines"][a][b] for b in names] for a in names]
    image = right.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r")
    right.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
    right.set_yticks(range(len(names)), names, fontsize=8)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            right.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
    right.set_title("cosine of mean clipped gradients", fontsize=9)
    fig.colorbar(image, ax=right, shrink=0.8)
    fig.savefig(png)


VIEWS: dict[str, tuple[Callable[[dict], str], Callable[[dict, Path], None]]] = {
    "dp-gap": (dp_gap_table, plot_dp_gap),
    "federation": (federation_table, plot_federation),
    "pretraining": (pretraining_table, plot_pretraining),
    "trainable": (trainable_table, plot_trainable),
    "controllability": (controllability_table, plot_controllability),
    "scale": (scale_table, plot_scale),
    "downstream": (downstream_table, plot_downstream),
    "levers": (levers_table, plot_levers),
    "dp-audit": (dp_audit_table, plot_dp_audit),
    "signal": (signal_table, plot_signal),
}
