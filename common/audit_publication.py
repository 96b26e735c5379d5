"""What of a site's memorisation audit may be shared: aggregates over enough records, rounded.

The audit (client/audit.py) measures a synthetic cohort against the site's private
subjects without DP. An exact distance between one synthetic volume and one patient's
record, or a quantile of a few of them, picks out that patient (a distance near 0 says
"this person was in training"); so the shared JSON and report.html carry a figure only
when at least `MIN_RECORDS` synthetic volumes and `MIN_RECORDS` distinct subjects stand
behind it, and then rounded to `SIGNIFICANT_DIGITS` significant digits; below that the
field is the text "withheld: fewer than 11 ...". The exact figures stay in the site's
private --out folder.

Why 11: the small-cell rule of health statistics (the US CMS cell size suppression policy:
no figure derived from 1 to 10 people is published). Why the mean of a window, not the
order statistic: a quantile read off sorted values (nearest-rank or interpolated) IS one or
two records' distances however many records there are; the mean of `MIN_RECORDS`
consecutive order statistics around the quantile's rank, from as many distinct subjects,
moves by at most 1/11 of the range when any one subject changes.

The rule, per field:
- a DCR or NNDR quantile (per synthetic volume, to its nearest subject of a set): the mean
  of the 11 order statistics centred on the nearest rank ceil(q M) of M volumes (the 11
  smallest or largest at the ends), published when M >= 11 and those 11 volumes' nearest
  subjects are 11 distinct subjects;
- the closer-to-training share (a mean over all M volumes and subsampled sets): published
  when M >= 11 and each set has at least 11 subjects in the share;
- the membership attack's ROC AUC (over all members x non-members): published when there
  are at least 11 members and 11 non-members; a TPR at a false-positive rate f rests on the
  threshold set by the f n_nonmembers highest-scoring non-members, so it is published only
  when f n_nonmembers >= 11 (and at least 11 members); the FPR resolution 1/n is rounded.
Set sizes (volumes, subjects, members), the seed and the loss draws are published as they
are: they are the sizes the site chose to audit, needed to read the figures.
"""

from __future__ import annotations

import math
import re

import numpy as np

from fedsynth.common.errors import FedsynthError

MIN_RECORDS = 11
SIGNIFICANT_DIGITS = 2
WITHHELD = "withheld: fewer than"
RULE = (
    f"each figure rests on at least {MIN_RECORDS} synthetic volumes and {MIN_RECORDS} "
    f"distinct subjects (a quantile is the mean of {MIN_RECORDS} order statistics around its "
    f"rank), rounded to {SIGNIFICANT_DIGITS} significant digits; otherwise withheld"
)
QUANTILES = {"q05": 0.05, "q25": 0.25, "median": 0.5}
FPR_TARGETS = {"tpr_at_1pct_fpr": 0.01, "tpr_at_0_1pct_fpr": 0.001}
_HEX64 = re.compile(r"[0-9a-f]{64}")

Published = float | str  # a rounded figure or "withheld: fewer than ..."


def withheld(what: str) -> str:
    """The text of a field below the minimum, e.g. withheld("synthetic volumes")."""
    return f"{WITHHELD} {MIN_RECORDS} {what}"


def rounded(value: float) -> float:
    """`value` to SIGNIFICANT_DIGITS significant digits (0.043217 -> 0.043)."""
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def quantile(values: np.ndarray, subjects: np.ndarray, q: float) -> Published:
    """A shareable q-quantile of per-volume `values` (M,) whose nearest subjects are
    `subjects` (M,): the rounded mean of the MIN_RECORDS order statistics centred on the
    nearest rank, or withheld (see the module docstring)."""
    m = len(values)
    if m < MIN_RECORDS:
        return withheld("synthetic volumes")
    order = np.argsort(values, kind="stable")
    rank = min(max(math.ceil(q * m) - 1, 0), m - 1)
    start = min(max(rank - MIN_RECORDS // 2, 0), m - MIN_RECORDS)
    window = order[start : start + MIN_RECORDS]
    if len(set(subjects[window].tolist())) < MIN_RECORDS:
        return withheld("distinct subjects behind it")
    return rounded(float(np.mean(values[window])))


def quantiles(values: np.ndarray | None, subjects: np.ndarray | None, prefix: str) -> dict:
    """{prefix_q05, prefix_q25, prefix_median}: shareable quantiles, None without values."""
    if values is None or subjects is None:
        return {f"{prefix}_{name}": None for name in QUANTILES}
    return {f"{prefix}_{name}": quantile(values, subjects, q) for name, q in QUANTILES.items()}


def share(value: float | None, volumes: int, subjects_per_set: int | None) -> Published | None:
    """The closer-to-training share, rounded, or withheld (see the module docstring)."""
    if value is None or subjects_per_set is None:
        return None
    if volumes < MIN_RECORDS:
        return withheld("synthetic volumes")
    if subjects_per_set < MIN_RECORDS:
        return withheld("subjects per set")
    return rounded(value)


def attack(metrics: dict) -> dict:
    """The membership attack's figures as shared: AUCs and TPRs rounded or withheld."""
    n_members, n_nonmembers = metrics["n_members"], metrics["n_nonmembers"]
    out = dict(metrics)
    few = n_members < MIN_RECORDS or n_nonmembers < MIN_RECORDS
    for key in ("auc", "auc_uncalibrated"):
        if metrics.get(key) is not None:
            out[key] = withheld("members or non-members") if few else rounded(metrics[key])
    for key, target in FPR_TARGETS.items():
        behind = target * n_nonmembers  # non-members above the threshold at that FPR
        if n_members < MIN_RECORDS:
            out[key] = withheld("members")
        elif behind < MIN_RECORDS:
            out[key] = withheld(f"non-members above the threshold ({target:g} x {n_nonmembers})")
        else:
            out[key] = rounded(metrics[key])
    out["fpr_resolution"] = rounded(metrics["fpr_resolution"])
    return out


# ------------------------------------------------------- the check of a shared audit


def _figure_ok(value: object, allowed: bool) -> bool:
    """A shared figure: None, withheld, or (where the counts allow one) a rounded number."""
    if value is None or (isinstance(value, str) and value.startswith(WITHHELD)):
        return True
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return allowed and math.isfinite(value) and rounded(float(value)) == value


def _count(audit: dict, *keys: str) -> int:
    value: object = audit
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def check_shared(audit: dict, where: str) -> None:
    """Refuse an audit JSON that publishes more than the rule allows: a figure that is not
    rounded, or one where the counts are below the minimum, or no cohort fingerprint.
    One line naming `where` and the field (FedsynthError)."""
    if not isinstance(audit.get("cohort_sha256"), str) or not _HEX64.fullmatch(
        audit["cohort_sha256"]
    ):
        raise FedsynthError(
            f"audit {where} names no audited cohort (cohort_sha256): audit the release with "
            "fedsynth audit --release"
        )
    volumes = _count(audit, "cohort_volumes")
    dcr = audit["dcr"]
    sets = {
        "train": _count(audit, "training_subjects"),
        "holdout": _count(audit, "holdout_subjects"),
    }
    allowed = {
        f"{p}_{q}": volumes >= MIN_RECORDS and n >= MIN_RECORDS
        for p, n in sets.items()
        for q in QUANTILES
    }
    allowed |= {f"nndr_{q}": allowed[f"train_{q}"] for q in ("q05", "median")}
    allowed["closer_to_training_share"] = (
        volumes >= MIN_RECORDS and _count(audit, "dcr", "share_subsampled_to") >= MIN_RECORDS
    )
    fields = [(f"dcr.{key}", dcr.get(key), ok) for key, ok in allowed.items()]
    mia = audit.get("membership_inference")
    if isinstance(mia, dict):
        members, nonmembers = _count(mia, "n_members"), _count(mia, "n_nonmembers")
        enough = members >= MIN_RECORDS and nonmembers >= MIN_RECORDS
        fields += [
            (f"membership_inference.{k}", mia.get(k), enough) for k in ("auc", "auc_uncalibrated")
        ]
        fields += [
            (f"membership_inference.{k}", mia.get(k), enough and t * nonmembers >= MIN_RECORDS)
            for k, t in FPR_TARGETS.items()
        ]
        fields.append(("membership_inference.fpr_resolution", mia.get("fpr_resolution"), True))
    elif mia is not None:
        raise FedsynthError(f"audit {where}: membership_inference is not an object")
    for name, value, ok in fields:
        if not _figure_ok(value, ok):
            raise FedsynthError(
                f"audit {where}: {name} is not a figure the site may share ({RULE}); share "
                "what fedsynth audit --json prints"
            )
