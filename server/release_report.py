"""report.html of a release: one self-contained page (PNG embedded, no external resources)
for a clinician and a privacy officer alike: what the cohort is, its privacy guarantee and
what it does not cover, how the volumes look, whether they match what was asked for, the
quality numbers, the sites' memorisation audits, and how to check and reproduce it all.
"""

from __future__ import annotations

import base64
import html
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

STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; color: #1d2733; max-width: 980px;
       margin: 2em auto; padding: 0 1.2em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.8em;
     border-bottom: 1px solid #d6dde5; padding-bottom: 0.2em; }
.lead { color: #4a5866; margin-top: 0; }
.glance { display: grid; grid-template-columns: repeat(auto-fit, minmax(190px, 1fr));
          gap: 0.8em; margin: 1.2em 0; }
.card { background: #f3f6f9; border-radius: 8px; padding: 0.7em 0.9em; }
.card b { display: block; font-size: 1.35em; } .card span { color: #4a5866; font-size: 0.9em; }
.warn { background: #fff6e0; border-left: 4px solid #e0a100; padding: 0.6em 0.9em; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { border-bottom: 1px solid #e3e8ee; padding: 0.3em 0.8em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td:first-child { white-space: nowrap; }
img { max-width: 100%; border: 1px solid #e3e8ee; border-radius: 4px; }
code, pre { background: #f3f6f9; border-radius: 4px; padding: 0.1em 0.3em; }
pre { padding: 0.7em; white-space: pre-wrap; word-break: break-all; }
"""


def _png(fig: Figure) -> str:
    """A matplotlib figure as an <img> with the PNG inline."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return _img(buffer.getvalue())


def _img(data: bytes, alt: str = "") -> str:
    encoded = base64.b64encode(data).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.4))
    rounds = np.arange(study.rounds_done + 1)
    for site, values in epsilon_by_round(study).items():
        ax.plot(rounds, values, marker="o", label=site)
    target = study.config.privacy.target_epsilon
    ax.axhline(target, color="0.4", ls="--", lw=1, label=f"target {target:g}")
    ax.set(xlabel="round", ylabel="epsilon (cumulative)", xticks=rounds, ylim=(0, None))
    title = f"privacy spent per site (delta {study.config.privacy.delta:g})"
    ax.set_title(title + "\nsites that spent alike share one line", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
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
    if isinstance(value, bool) or value is None:
        return html.escape(str(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "n/a" if not np.isfinite(value) else f"{value:.4g}"
    return html.escape(str(value))


def _table(rows: list[tuple], header: tuple) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = ""
    for row in rows:
        cells = "".join(
            f'<td class="num">{_number(c)}</td>'
            if isinstance(c, int | float) and not isinstance(c, bool)
            else f"<td>{_number(c)}</td>"
            for c in row
        )
        body += f"<tr>{cells}</tr>"
    return f"<table><tr>{head}</tr>{body}</table>"


def _leaves(value: object, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, number or short text) of a nested dict's scalar leaves."""
    if isinstance(value, dict):
        out = []
        for key, inner in value.items():
            out += _leaves(inner, f"{prefix}.{key}" if prefix else str(key))
        return out
    if isinstance(value, list):
        return [] if len(value) > 6 else [(prefix, ", ".join(_number(v) for v in value))]
    return [(prefix, value)]


def _privacy_section(study: FinishedStudy, statement: dict) -> str:
    rows = []
    for site, entry in statement["sites"].items():
        sigmas, rates = entry["noise_multipliers"], entry["sample_rates"]  # in round order
        rows.append(
            (
                site,
                entry["epsilon"],
                entry["delta"],
                len(entry["rounds"]),
                entry["total_steps"],
                ", ".join(f"{s:.3g}" for s in sigmas),
                ", ".join(f"{q:.3g}" for q in rates),
                entry["no_reply_estimates"],
            )
        )
    header = (
        "site",
        "epsilon",
        "delta",
        "rounds",
        "DP-SGD steps",
        "noise multiplier",
        "sample rate",
        "no-reply estimates",
    )
    secagg = statement["secure_aggregation"]
    if secagg["rounds"]:
        thresholds = sorted({r["reconstruction_threshold"] for r in secagg["rounds"].values()})
        secure = (
            f"on ({html.escape(secagg['protocol'])}; reconstruction threshold "
            f"{', '.join(map(str, thresholds)) or 'n/a'}; a round is aggregated only when at "
            f"least {secagg['min_sites']} sites trained)"
        )
        if secagg["plain_rounds"]:
            plain = ", ".join(map(str, secagg["plain_rounds"]))
            secure += f", except in round(s) {plain}, where it was off"
    else:
        secure = "off: the coordinator saw each site's update (DP still holds)"
    estimates = statement["no_reply_estimates"]
    counted = (
        f"<p><b>No-reply estimates:</b> {estimates['count']} "
        f"({html.escape(', '.join(estimates['sites']))}). "
        f"{html.escape(estimates['meaning'])}</p>"
        if estimates["count"]
        else ""
    )
    items = "".join(f"<li>{html.escape(t)}</li>" for t in statement["not_covered"])
    clear = "".join(f"<li>{html.escape(t)}</li>" for t in statement["in_clear"])
    return f"""
<h2>Privacy</h2>
<p><b>Guarantee:</b> {html.escape(statement["guarantee"])}. In plain words: whether or not
any one patient's scans and attributes were used, what anyone can learn from this cohort
changes by at most a factor e<sup>&epsilon;</sup> (about {math.exp(statement["study_epsilon"]):,.0f}
here: a strong guarantee needs a small epsilon), except with probability &delta;. The sample
rates below imply each site's subject count.
Each site's epsilon is recomputed from the ledger shipped with this release
(<code>ledger.jsonl</code>) with {html.escape(statement["accountant_library"])}'s
{html.escape(statement["accountant"].upper())} accountant; per-subject gradients were clipped
to norm {statement["clip"]:g}, the {html.escape(statement["trainable"])} layers of the latent
UNet were trained.</p>
{_table(rows, header)}
{counted}
{_epsilon_plot(study)}
<p><b>Secure aggregation</b> {secure}.</p>
<p><b>Trust model.</b> {html.escape(statement["trust_model"])}</p>
<p><b>What travelled in clear</b> (no images, no attributes):</p><ul>{clear}</ul>
<div class="warn"><b>Not covered by the guarantee:</b><ul>{items}</ul></div>
"""


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


def _quality_section(evaluation: dict | None) -> str:
    if evaluation is None:
        return (
            "<h2>Quality</h2><p>No reference data was given to this release "
            "(<code>--reference</code>), so fidelity, diversity and utility were not "
            "measured here; <code>fedsynth evaluate</code> measures them against any "
            "site-style folder.</p>"
        )
    real = evaluation["real"]
    notes = "".join(f"<li>{html.escape(str(n))}</li>" for n in evaluation.get("notes", []))
    header = ("measure", "synthetic", "real", "how to read it")
    return f"""
<h2>Quality</h2>
<p>Measured against the reference data given to the release ({real["volumes"]} volumes of
{real["subjects"]} subjects). Fidelity compares features of networks fedsynth trains on
public data; diversity compares pairs within each set; utility trains a small model on the
synthetic cohort and tests it on real volumes.</p>
{_table(_quality_rows(evaluation), header)}
<details><summary>Notes on the measures</summary><ul>{notes}</ul></details>
"""


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


def _audit_section(audits: list[dict], fingerprint: str) -> str:
    """The sites' shared audits (already checked against the sharing rule by read_audits),
    each with whether it measured this release's cohort (`fingerprint`: the SHA-256 of
    cohort.sha256)."""
    cohort = (
        f"<p>This release's cohort fingerprint (SHA-256 of <code>{COHORT_HASHES}</code>): "
        f"<code>{fingerprint}</code>, also named in <code>privacy.json</code>. "
        "<code>fedsynth audit --release</code> audits only a cohort whose every file matches "
        "that record and whose <code>privacy.json</code> names it, and prints the "
        "fingerprint it audited: a site compares it with this one before sharing.</p>"
    )
    if not audits:
        return (
            "<h2>Memorisation audits</h2><p>No site audit was given (<code>--audit</code>). "
            "A site runs <code>fedsynth audit</code> on its own machine and shares the "
            f"aggregate numbers if it chooses.</p>{cohort}"
        )
    parts = []
    for audit in audits:
        facts = (
            f"{audit['cohort_volumes']} synthetic volumes, {audit['training_subjects']} "
            f"training and {audit.get('holdout_subjects') or 0} held-out subjects "
            f"({COUNTS_READ[audit['subject_counts']]}); "
        )
        facts += (
            "audited this release's cohort"
            if audit["cohort_sha256"] == fingerprint
            else "audited another cohort, fingerprint "
            f"<code>{html.escape(audit['cohort_sha256'])}</code> (an earlier release)"
        )
        table = _table(_audit_rows(audit), ("measure", "value", "how to read it"))
        parts.append(f"<h3>{html.escape(audit['label'])}</h3><p>{facts}</p>{table}")
    return (
        '<h2>Memorisation audits</h2><div class="warn">These numbers were computed by the '
        "sites on their private data without differential privacy: they are outside the DP "
        "guarantee, shared at each site's discretion. What a site shares is aggregate only: "
        f"{html.escape(RULE)}.</div>{cohort}" + "".join(parts)
    )


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
    shape = "x".join(map(str, config.data.shape))
    spacing = " x ".join(f"{s:g}" for s in config.data.spacing)
    control_html = (
        "<p>No anatomy meter in the checkpoint: sizes were not measured.</p>"
        if control is None
        else _control_plot(control)
    )
    trained = sum(1 for entry in statement["sites"].values() if entry["total_steps"] > 0)
    secure = statement["secure_aggregation"]["enabled"]
    glance = [
        (f"{len(rows)}", "synthetic volumes (not patients)"),
        (f"&epsilon; {statement['study_epsilon']:.3g}", f"delta {config.privacy.delta:g}"),
        (str(trained), "hospitals trained; their data never left them"),
        (f"{study.rounds_done}/{config.federation.rounds}", "federated rounds"),
    ]
    cards = "".join(f"<div class='card'><b>{v}</b><span>{t}</span></div>" for v, t in glance)
    created = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fedsynth release</title>
<style>{STYLE}</style></head><body>
<h1>Synthetic cardiac MRI cohort</h1>
<p class="lead">Released by fedsynth {html.escape(statement.get("fedsynth", ""))} on {created}
from study <code>{html.escape(str(statement.get("study_id")))}</code>. Every volume is generated
by a model; none is a patient's scan.</p>
<div class="glance">{cards}</div>

<h2>What this is</h2>
<p>{len(rows)} short-axis 3D volumes of {shape} voxels (voxels of {spacing} mm, base to apex), each
generated for the clinical attributes in <code>cohort/manifest.csv</code> (LV/RV volumes,
ejection fractions, wall thickness, age, sex, BMI, cardiac phase). A latent diffusion model
pretrained on public data was finetuned by {trained} hospitals with differentially private
SGD; only noised updates left them{", securely aggregated" if secure else ""}.</p>

<h2>How the volumes look</h2>
<p>Basal, mid and apical slices of the first volumes, with the attributes they were asked
for.</p>
{_img((folder / MONTAGE).read_bytes(), "montage of synthetic volumes")}

<h2>Do they match what was asked for?</h2>
<p>LV and RV blood-pool volumes measured on each synthetic volume by a segmenter trained on
public label maps, against the volume requested for its phase (ED or ES).</p>
{control_html}
{_quality_section(evaluation)}
{_privacy_section(study, statement)}
{_audit_section(audits, file_sha256(folder / COHORT_HASHES))}

<h2>Check and reproduce</h2>
<pre>fedsynth privacy verify --release RELEASE_DIR   # every epsilon, from ledger.jsonl
{html.escape(command)}
fedsynth evaluate --real REFERENCE_DIR --synthetic RELEASE_DIR/cohort</pre>
</body></html>
"""
    path = folder / REPORT
    atomic_write_text(path, page, PUBLIC_MODE)
    return path
