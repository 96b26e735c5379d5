"""report.html of a release: one self-contained page (PNG embedded, no external resources)
for a privacy officer and a clinician alike. It leads with the guarantee: who is protected,
epsilon and delta, what they mean at this epsilon, the sites' audits with their power, and
what is not covered; then quality, a compact montage, the accounting in detail, the audits
and how to check and reproduce it all. The page is the Jinja2 template
server/templates/report.html, rendered with autoescaping: every value is escaped.
"""

from __future__ import annotations

import base64
import io
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedsynth.common.accountant import epsilon
from fedsynth.common.audit_publication import RULE
from fedsynth.common.checkpoint import file_sha256
from fedsynth.common.cohort_hashes import COHORT_HASHES
from fedsynth.common.io import PUBLIC_MODE, atomic_write_text
from fedsynth.common.ledger import charged, segment_of
from fedsynth.common.sampling import MONTAGE
from fedsynth.server.finished_study import FinishedStudy

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPORT = "report.html"

TEMPLATE = "report.html"  # in server/templates
PRIOR = 0.01  # the attacker's prior that one patient was trained on, for the plain words


def _png(fig: Figure) -> str:
    """A matplotlib figure as a data: URI of its PNG."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return _data_uri(buffer.getvalue())


def _data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def epsilon_by_round(study: FinishedStudy) -> dict[str, list[float]]:
    """Site -> its epsilon after each round 0..rounds_done, from the lines that count."""
    privacy = study.config.privacy
    curves = {}
    for site in sorted(study.site_epsilon):
        lines = charged(study.ledger, site)
        curves[site] = [
            epsilon(
                [segment_of(e) for e in lines if int(e["round"]) <= r],
                privacy.delta,
                privacy.accountant,
            )
            for r in range(study.rounds_done + 1)
        ]
    return curves


def _epsilon_plot(study: FinishedStudy) -> str:
    """Epsilon per site by round; sites whose curves are identical share one labelled line
    (else the last drawn would hide the others)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[float, ...], list[str]] = {}
    for site, values in epsilon_by_round(study).items():
        groups.setdefault(tuple(round(v, 9) for v in values), []).append(site)
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    rounds = np.arange(study.rounds_done + 1)
    for curve, sites in groups.items():
        ax.plot(rounds, curve, marker="o", label=" = ".join(sites))
    target = study.config.privacy.target_epsilon
    ax.axhline(target, color="0.4", ls="--", lw=1, label=f"target {target:g}")
    ax.set(xlabel="round", ylabel="epsilon (cumulative)", xticks=rounds, ylim=(0, None))
    alike = (
        " (sites joined by = spent alike: one line)"
        if len(groups) < len(study.site_epsilon)
        else ""
    )
    ax.set_title(f"privacy spent per site, delta {study.config.privacy.delta:g}{alike}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _control_plot(control: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.8))
    for ax, side, name in zip(axes, ("lv", "rv"), ("LV", "RV"), strict=True):
        requested = np.array(control[side]["requested_ml"])
        measured = np.array(control[side]["measured_ml"])
        ax.scatter(requested, measured, s=18, alpha=0.8)
        low, high = min(requested.min(), measured.min()), max(requested.max(), measured.max())
        ax.plot([low, high], [low, high], color="0.5", ls="--", lw=1, label="measured = asked")
        r, mae = control[side]["pearson_r"], control[side]["mae_ml"]
        ax.set_title(f"{name} blood pool: r {r:.2f}, MAE {mae:.0f} mL", fontsize=10)
        ax.set(xlabel="asked for (mL)", ylabel="measured on the volume (mL)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _number(value: object) -> str:
    """A table cell: floats to 4 significant digits, non-finite as n/a, the rest as text."""
    if isinstance(value, float) and not isinstance(value, bool):
        return "n/a" if not np.isfinite(value) else f"{value:.4g}"
    return str(value)


def plain_words(epsilon_value: float, prior: float = PRIOR) -> str:
    """What the bound rules out at this epsilon, as an attacker's odds (ignoring delta): a
    prior p that one patient was trained on can become at most e^eps p / (1 - p + e^eps p)
    (the posterior bound of pure DP; Kasiviswanathan & Smith 2014, "On the semantics of
    differential privacy: a Bayesian formulation")."""
    posterior = 1 / (1 + (1 - prior) / prior * math.exp(-epsilon_value))  # no overflow
    odds = (
        f"An attacker who thought a given patient {prior:.0%} likely to be among the training "
        f"subjects can, from the model or the cohort, become at most {posterior:.1%} sure."
    )
    if epsilon_value <= 1:
        return f"{odds} A strong bound: it rules out learning much about any one patient."
    if epsilon_value <= 5:
        return (
            f"{odds} A moderate bound: it limits, but does not rule out, inference about "
            "one patient."
        )
    return (
        f"{odds} On its own the bound rules out little at this epsilon; it is an upper limit "
        "over every possible attack and patient. What known attacks achieve is measured by "
        "the audits beside it, which are evidence, not a guarantee."
    )


def rounded_up(value: float, digits: int = 3) -> str:
    """`value` to `digits` significant digits, never below it (10.04 -> 10.1): a stated
    epsilon must not round down."""
    if value <= 0 or not math.isfinite(value):
        return f"{value:g}"
    step = 10 ** (math.floor(math.log10(value)) - digits + 1)
    return f"{math.ceil(value / step - 1e-9) * step:.{max(0, -math.floor(math.log10(step)))}f}"


def audit_line(audit: dict, fingerprint: str) -> str:
    """One sentence per shared audit: the attack's AUC with its 95% interval, TPR at 1%
    FPR, how many members and non-members stand behind them, and what their sizes leave
    the figures worth (common/audit_publication.attack_notes); whether it audited this
    release's cohort (`fingerprint`)."""
    attack = audit.get("membership_inference")
    other = "" if audit["cohort_sha256"] == fingerprint else " (of an earlier release's cohort)"
    if not attack:
        return f"{audit['label']}{other}: distances only (no membership attack shared)."
    members, nonmembers = attack["n_members"], attack["n_nonmembers"]
    auc, low, high = attack["auc"], attack.get("auc_ci95_low"), attack.get("auc_ci95_high")
    shown = f"AUC {_number(auc)}"
    if isinstance(low, float) and isinstance(high, float):  # as published: rounded outward
        shown += f" (95% interval {low:g} to {high:g}; 0.5 = chance)"
    text = (
        f"{audit['label']}{other}: loss attack {shown}, TPR at 1% FPR "
        f"{_number(attack['tpr_at_1pct_fpr'])}, on {members} members and {nonmembers} "
        f"non-members (as published)"
    )
    notes = [attack.get(key) for key in ("fpr_not_resolvable", "few_subjects")]
    return "; ".join([text, *(str(n) for n in notes if n)]) + "."


def _site_rows(statement: dict) -> list[tuple]:
    return [
        (
            site,
            entry["epsilon"],
            entry["delta"],
            len(entry["rounds"]),
            entry["total_steps"],
            ", ".join(f"{s:.3g}" for s in entry["noise_multipliers"]),  # in round order
            ", ".join(f"{q:.3g}" for q in entry["sample_rates"]),
            entry["no_reply_estimates"],
        )
        for site, entry in statement["sites"].items()
    ]


def _secure_text(secagg: dict) -> str:
    if not secagg["rounds"]:
        return "off: the coordinator saw each site's noised update (DP still holds)"
    thresholds = sorted({r["reconstruction_threshold"] for r in secagg["rounds"].values()})
    text = (
        f"on ({secagg['protocol']}; reconstruction threshold "
        f"{', '.join(map(str, thresholds)) or 'n/a'}; every sampled site holds shares of "
        f"the others' secrets; a round is aggregated only when at least "
        f"{secagg['min_sites']} sites trained)"
    )
    if secagg["plain_rounds"]:
        text += (
            f", except in round(s) {', '.join(map(str, secagg['plain_rounds']))}, where it was off"
        )
    return text


def _quality_rows(evaluation: dict) -> list[tuple]:
    """(measure, synthetic, real reference, how to read it) of `evaluate_cohort`'s output;
    fidelity's "real" is between two subject halves of the reference: the yardstick."""
    rows = []
    for key, label in (("3d", "volumes"), ("2d", "short-axis slices")):
        fid = evaluation["fidelity"].get(key)
        if fid:
            halves = fid.get("real_halves") or {}
            rows.append(
                (
                    f"Frechet distance, {label}",
                    fid["frechet_distance"],
                    halves.get("frechet_distance", ""),
                    "lower is closer; real = between two halves of the reference",
                )
            )
            rows.append(
                (
                    f"kernel MMD², {label}",
                    fid["mmd2"],
                    halves.get("mmd2", ""),
                    "lower is closer (about 0 = alike); real = between two halves",
                )
            )
    diversity = evaluation["diversity"]
    rows.append(
        (
            "MS-SSIM between pairs",
            diversity["synthetic_ms_ssim"]["mean"],
            diversity["real_ms_ssim"]["mean"],
            "1 = identical volumes; near the real pairs' value is good",
        )
    )
    utility = evaluation.get("utility")
    if utility:
        for key, what in (("mae_ml", "MAE (mL)"), ("pearson_r", "r")):
            rows.append(
                (
                    f"LV volume regressor tested on real, {what}",
                    utility["tstr"][key],
                    utility["trtr"][key],
                    "trained on the synthetic cohort vs on real volumes",
                )
            )
    return rows


def _audit_rows(audit: dict) -> list[tuple]:
    dcr, attack = audit["dcr"], audit.get("membership_inference")
    rows = [
        (
            "synthetic volumes closer to a training than to a held-out subject",
            dcr.get("closer_to_training_share"),
            "0.5 = no sign of copying; 1 = all closer",
        ),
        (
            "median distance to the closest training / held-out subject (RMSE)",
            f"{_number(dcr['train_median'])} / {_number(dcr.get('holdout_median'))}",
            "alike = no sign of copying",
        ),
        (
            "median nearest / second-nearest training distance",
            dcr.get("nndr_median"),
            "near 0 = a near-copy of one subject; near 1 = no single source",
        ),
    ]
    if attack:
        rows += [
            ("membership attack, ROC AUC", attack["auc"], "0.5 = chance; 1 = always right"),
            (
                "membership attack, TPR at 1% FPR",
                attack["tpr_at_1pct_fpr"],
                f"FPR resolution {_number(attack['fpr_resolution'])} or finer "
                f"({attack['n_members']} members, {attack['n_nonmembers']} non-members, as "
                "published)",
            ),
        ]
    return rows


COUNTS_READ = {  # an audit's subject_counts, as the report says it
    "rounded": "the site's public sizes: its counts rounded down",
    "declared": "training as the site's declared public size, held-out rounded down",
    "exact": "exact counts, disclosed by the site",
}


def _audits(audits: list[dict], fingerprint: str) -> list[dict]:
    """Each shared audit (already checked against the sharing rule by read_audits) as the
    template shows it: label, what it measured, and its rows."""
    shown = []
    for audit in audits:
        facts = (
            f"{audit['cohort_volumes']} synthetic volumes, {audit['training_subjects']} "
            f"training and {audit.get('holdout_subjects') or 0} held-out subjects "
            f"({COUNTS_READ[audit['subject_counts']]}); "
        )
        facts += (
            "audited this release's cohort"
            if audit["cohort_sha256"] == fingerprint
            else f"audited another cohort, fingerprint {audit['cohort_sha256']} (an earlier "
            "release)"
        )
        shown.append({"label": audit["label"], "facts": facts, "rows": _audit_rows(audit)})
    return shown


def render(context: dict) -> str:
    """The template filled with `context`, every value escaped."""
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    environment = Environment(
        loader=PackageLoader("fedsynth.server", "templates"),
        autoescape=select_autoescape(["html"]),
        undefined=StrictUndefined,
    )
    environment.filters["num"] = _number
    return environment.get_template(TEMPLATE).render(**context)


def write_report(
    folder: Path,
    study: FinishedStudy,
    statement: dict,
    rows: list[dict],
    control: dict | None,
    evaluation: dict | None,
    audits: list[dict],
    command: str,
) -> Path:
    """folder/report.html from a release's parts (the montage is folder/montage.png)."""
    config = study.config
    study_epsilon = float(statement["study_epsilon"])
    estimates = statement["no_reply_estimates"]
    fingerprint = file_sha256(folder / COHORT_HASHES)
    context = {
        "version": statement.get("fedsynth", ""),
        "created": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "study_id": str(statement.get("study_id")),
        "epsilon": rounded_up(study_epsilon),
        "delta": config.privacy.delta,
        "factor": f"{math.exp(study_epsilon):,.0f}" if study_epsilon < 50 else "astronomical",
        "meaning": plain_words(study_epsilon),
        "trained": sum(1 for e in statement["sites"].values() if e["total_steps"] > 0),
        "secure": statement["secure_aggregation"]["enabled"],
        "volumes": len(rows),
        "audit_lines": [audit_line(a, fingerprint) for a in audits],
        "not_covered": statement["not_covered"],
        "shape": "x".join(map(str, config.data.shape)),
        "spacing": " x ".join(f"{s:g}" for s in config.data.spacing),
        "control_png": None if control is None else _control_plot(control),
        "quality_rows": _quality_rows(evaluation) if evaluation else [],
        "reference_volumes": evaluation["real"]["volumes"] if evaluation else 0,
        "reference_subjects": evaluation["real"]["subjects"] if evaluation else 0,
        "quality_notes": [str(n) for n in (evaluation or {}).get("notes", [])],
        "montage_png": _data_uri((folder / MONTAGE).read_bytes()),
        "guarantee": statement["guarantee"],
        "accountant_library": statement["accountant_library"],
        "accountant": statement["accountant"].upper(),
        "clip": f"{statement['clip']:g}",
        "trainable": statement["trainable"],
        "site_rows": _site_rows(statement),
        "estimates_count": estimates["count"],
        "estimates_sites": ", ".join(estimates["sites"]),
        "estimates_meaning": estimates["meaning"],
        "epsilon_png": _epsilon_plot(study),
        "secure_text": _secure_text(statement["secure_aggregation"]),
        "trust_model": statement["trust_model"],
        "in_clear": statement["in_clear"],
        "audits": _audits(audits, fingerprint),
        "rule": RULE,
        "cohort_hashes": COHORT_HASHES,
        "fingerprint": fingerprint,
        "command": command,
    }
    path = folder / REPORT
    atomic_write_text(path, render(context), PUBLIC_MODE)
    return path
