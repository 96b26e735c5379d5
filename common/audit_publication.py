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
moves by at most 1/11 of the range when any one subject changes. Two such means whose
windows overlap without being the same differ by fewer than 11 records (windows 0-10 and
1-11: 11 x their difference is x_11 - x_0, one record's distance), so of one series'
quantiles only those whose windows are identical or disjoint are published.

The rule, per field:
- a DCR or NNDR quantile (per synthetic volume, to its nearest subject of a set): the mean
  of the 11 order statistics centred on the nearest rank ceil(q M) of M volumes (the 11
  smallest or largest at the ends), published when M >= 11, those 11 volumes' nearest
  subjects are 11 distinct subjects and its window is identical to or disjoint from the
  window of every quantile of the same series already published (in the order median,
  q25, q05);
- the closer-to-training share (a mean over all M volumes and subsampled sets): published
  when M >= 11, each set has at least 11 subjects in the share and the volumes' nearest
  subjects include at least 11 distinct ones in each set;
- the membership attack's ROC AUC (over all members x non-members): published when there
  are at least 11 members and 11 non-members; a TPR at a false-positive rate f rests on the
  threshold set by the f n_nonmembers highest-scoring non-members, so it is published only
  when f n_nonmembers >= 11 (and at least 11 members);
- a rate that is a count over a published total (a TPR over the members, the share over
  the volumes) is withheld when that count, or the rest of the total, is 1 to 10
  (TPR 0.02 of 50 members is one patient flagged).
Set sizes: the cohort's volumes, the seed and the loss draws are published as they are.
The site's subject counts (training_subjects = n_members, holdout_subjects = n_nonmembers,
share_subsampled_to, and fpr_resolution = 1 / n_nonmembers) are published as the site's
public size, the rule of client/public_size.py, recorded in `subject_counts`: "rounded"
(n rounded down to two significant figures and a multiple of 10, 1 below 10), "declared"
(the training set's size as the site declared it, --public-subjects; held-out rounded) or
"exact" (the site opted in, --disclose-subject-count).

check_shared refuses a shared audit with any key outside this layout (nested too), a
figure the counts do not allow, or a count not in its published form: one line naming
the field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from fedsynth.common.errors import FedsynthError
from fedsynth.common.subject_rounding import rounded_down, rounding_step

MIN_RECORDS = 11
SIGNIFICANT_DIGITS = 2
WITHHELD = "withheld: fewer than"
RULE = (
    f"each figure rests on at least {MIN_RECORDS} synthetic volumes and {MIN_RECORDS} "
    f"distinct subjects (a quantile is the mean of {MIN_RECORDS} order statistics around its "
    f"rank; two quantiles' windows are identical or disjoint), rounded to "
    f"{SIGNIFICANT_DIGITS} significant digits; no rate is a count of 1 to "
    f"{MIN_RECORDS - 1}; subject counts are the site's public sizes; otherwise withheld"
)
QUANTILES = {"q05": 0.05, "q25": 0.25, "median": 0.5}
PRIORITY = ("median", "q25", "q05")  # which of two overlapping quantiles is published
FPR_TARGETS = {"tpr_at_1pct_fpr": 0.01, "tpr_at_0_1pct_fpr": 0.001}
SCORES = ("reference loss - model loss", "-model loss")
SUBJECT_COUNTS = ("rounded", "declared", "exact")  # how the site's counts are published
_HEX64 = re.compile(r"[0-9a-f]{64}")

Published = float | str  # a rounded figure or "withheld: fewer than ..."


def withheld(what: str) -> str:
    """The text of a field below the minimum, e.g. withheld("synthetic volumes")."""
    return f"{WITHHELD} {MIN_RECORDS} {what}"


def rounded(value: float) -> float:
    """`value` to SIGNIFICANT_DIGITS significant digits (0.043217 -> 0.043)."""
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def small_count(rate: float, total: int) -> bool:
    """Whether `rate` x `total` (a count over a published total), or the rest of the
    total, is a cell of 1 to MIN_RECORDS - 1 records."""
    count = round(rate * total)
    return 1 <= count < MIN_RECORDS or 1 <= total - count < MIN_RECORDS


def public_count(subjects: int) -> int:
    """A set's default public size (client/public_size.py): n rounded down to two
    significant figures and a multiple of 10, 1 below 10."""
    return max(1, rounded_down(subjects))


def window_start(q: float, m: int) -> int:
    """First order statistic (0-based) of the MIN_RECORDS-wide window of the q-quantile
    of m >= MIN_RECORDS values: centred on the nearest rank ceil(q m), kept inside."""
    rank = min(max(math.ceil(q * m) - 1, 0), m - 1)
    return min(max(rank - MIN_RECORDS // 2, 0), m - MIN_RECORDS)


def _apart(start: int, others: Sequence[int]) -> bool:
    """A window identical to or disjoint from each of `others` (no two published means
    then differ by fewer than MIN_RECORDS records)."""
    return all(start == s or abs(start - s) >= MIN_RECORDS for s in others)


def quantile(values: np.ndarray, subjects: np.ndarray, q: float) -> Published:
    """A shareable q-quantile of per-volume `values` (M,) whose nearest subjects are
    `subjects` (M,): the rounded mean of the MIN_RECORDS order statistics centred on the
    nearest rank, or withheld (see the module docstring)."""
    m = len(values)
    if m < MIN_RECORDS:
        return withheld("synthetic volumes")
    order = np.argsort(values, kind="stable")
    start = window_start(q, m)
    window = order[start : start + MIN_RECORDS]
    if len(set(subjects[window].tolist())) < MIN_RECORDS:
        return withheld("distinct subjects behind it")
    return rounded(float(np.mean(values[window])))


def quantiles(
    values: np.ndarray | None,
    subjects: np.ndarray | None,
    prefix: str,
    names: Sequence[str] = tuple(QUANTILES),
) -> dict:
    """{prefix_NAME} for NAME in `names`: shareable quantiles of one series, a quantile
    whose window overlaps a published one's without being it withheld; None without
    values."""
    if values is None or subjects is None:
        return {f"{prefix}_{name}": None for name in names}
    out: dict[str, Published] = {}
    starts: list[int] = []
    for name in (n for n in PRIORITY if n in names):
        figure = quantile(values, subjects, QUANTILES[name])
        if isinstance(figure, float):
            start = window_start(QUANTILES[name], len(values))
            if not _apart(start, starts):
                figure = withheld(f"records apart from a published quantile's window ({name})")
            else:
                starts.append(start)
        out[f"{prefix}_{name}"] = figure
    return {f"{prefix}_{name}": out[f"{prefix}_{name}"] for name in names}


def share(
    value: float | None, volumes: int, subjects_per_set: int | None, distinct: int
) -> Published | None:
    """The closer-to-training share, rounded, or withheld (see the module docstring).
    `distinct`: the fewest distinct nearest subjects of the volumes in either set."""
    if value is None or subjects_per_set is None:
        return None
    if volumes < MIN_RECORDS:
        return withheld("synthetic volumes")
    if subjects_per_set < MIN_RECORDS:
        return withheld("subjects per set")
    if distinct < MIN_RECORDS:
        return withheld("distinct nearest subjects in a set")
    if small_count(value, volumes) or small_count(rounded(value), volumes):
        return withheld("volumes on one side of the share")
    return rounded(value)


def attack(metrics: dict, members: int | None = None, nonmembers: int | None = None) -> dict:
    """The membership attack's figures as shared: AUCs and TPRs rounded or withheld, the
    set sizes as published (`members`, `nonmembers`: the public sizes; None: exact)."""
    n_members, n_nonmembers = metrics["n_members"], metrics["n_nonmembers"]
    members = n_members if members is None else members
    nonmembers = n_nonmembers if nonmembers is None else nonmembers
    out = dict(metrics) | {"n_members": members, "n_nonmembers": nonmembers}
    few = n_members < MIN_RECORDS or n_nonmembers < MIN_RECORDS
    for key in ("auc", "auc_uncalibrated"):
        if metrics.get(key) is not None:
            out[key] = withheld("members or non-members") if few else rounded(metrics[key])
    for key, target in FPR_TARGETS.items():
        behind = target * n_nonmembers  # non-members above the threshold at that FPR
        tpr = metrics[key]
        if n_members < MIN_RECORDS:
            out[key] = withheld("members")
        elif behind < MIN_RECORDS:
            out[key] = withheld(f"non-members above the threshold ({target:g} x {nonmembers})")
        elif small_count(tpr, n_members) or small_count(rounded(tpr), members):
            out[key] = withheld("members flagged, or not flagged, at that FPR")
        else:
            out[key] = rounded(tpr)
    out["fpr_resolution"] = rounded(1.0 / nonmembers)
    return out


# ------------------------------------------------------- the check of a shared audit

DCR_KEYS = frozenset(
    {f"{p}_{q}" for p in ("train", "holdout") for q in QUANTILES}
    | {"closer_to_training_share", "share_subsampled_to", "nndr_q05", "nndr_median"}
)
MIA_KEYS = frozenset(
    {"score", "auc", "auc_uncalibrated", *FPR_TARGETS, "fpr_resolution", "loss_draws"}
    | {"n_members", "n_nonmembers"}
)
PUBLISHED = {"min_records": MIN_RECORDS, "significant_digits": SIGNIFICANT_DIGITS, "rule": RULE}
TOP_KEYS = frozenset(
    {"outside_dp_guarantee", "note", "distance", "published", "cohort_sha256", "seed"}
    | {"cohort_volumes", "training_subjects", "holdout_subjects", "subject_counts"}
    | {"dcr", "membership_inference"}
)


def _refuse(where: str, what: str) -> FedsynthError:
    return FedsynthError(f"audit {where}: {what}; share what fedsynth audit --json prints")


def _check_layout(audit: dict, where: str) -> None:
    """Only the keys and value types the audit writes, nested too (an exact figure under a
    key the check does not know would otherwise be published)."""
    nested = {"dcr": DCR_KEYS, "membership_inference": MIA_KEYS, "published": PUBLISHED}
    for key in audit:
        if key not in TOP_KEYS:
            raise _refuse(where, f"{key} is not a field of a shared audit")
    for key, allowed in nested.items():
        value = audit.get(key)
        if key == "membership_inference" and value is None:
            continue
        if not isinstance(value, dict):
            raise _refuse(where, f"{key} is not an object")
        for inner in value:
            if inner not in allowed:
                raise _refuse(where, f"{key}.{inner} is not a field of a shared audit")
    if audit["published"] != PUBLISHED:
        raise _refuse(where, "published is not this version's sharing rule")
    texts = ("note", "distance")
    if audit.get("outside_dp_guarantee") is not True or any(
        not isinstance(audit.get(k), str | None) for k in texts
    ):
        raise _refuse(where, "outside_dp_guarantee, note or distance is not the audit's")
    for name, value in (("seed", audit.get("seed")), ("loss_draws", _get(audit, "loss_draws"))):
        if value is not None and not _is_int(value):
            raise _refuse(where, f"{name} is not an integer")
    if audit["membership_inference"] is not None and _get(audit, "score") not in SCORES:
        raise _refuse(where, "membership_inference.score is not one of the audit's scores")


def _get(audit: dict, key: str) -> object:
    mia = audit.get("membership_inference")
    return mia.get(key) if isinstance(mia, dict) else None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _figure_ok(value: object, allowed: bool) -> bool:
    """A shared figure: None, withheld, or (where the counts allow one) a rounded number."""
    if value is None or (isinstance(value, str) and value.startswith(WITHHELD)):
        return True
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return allowed and math.isfinite(value) and rounded(float(value)) == value


def _most_subjects(audit: dict, key: str, where: str) -> tuple[int | None, float]:
    """A published subject count and the most subjects it may stand for (its rounding
    bucket's top; unbounded for a declared size, itself when exact); (None, 0) for a
    set not given. Refuses a count not in the form `subject_counts` says."""
    mode, value = audit["subject_counts"], audit.get(key)
    if value is None and key == "holdout_subjects":
        return None, 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _refuse(where, f"{key} is not a subject count")
    if mode == "exact":
        return value, value
    if mode == "declared" and key == "training_subjects":
        return value, math.inf
    if public_count(value) != value:
        raise _refuse(
            where,
            f"{key} is not a public size (rounded down to two significant figures and a "
            "multiple of 10) though subject_counts is not exact: an undisclosed count",
        )
    return value, 9 if value == 1 else value + rounding_step(value) - 1


def _check_counts(audit: dict, where: str) -> dict[str, float]:
    """The published set sizes agree with each other and `subject_counts`; returns the
    most subjects each may stand for (training, holdout, members, nonmembers, share)."""
    if audit.get("subject_counts") not in SUBJECT_COUNTS:
        raise _refuse(where, f"subject_counts is not one of {', '.join(SUBJECT_COUNTS)}")
    if not _is_int(audit.get("cohort_volumes")):
        raise _refuse(where, "cohort_volumes is not a count")
    train, most_train = _most_subjects(audit, "training_subjects", where)
    holdout, most_holdout = _most_subjects(audit, "holdout_subjects", where)
    size = None if holdout is None else min(train, holdout)  # type: ignore[type-var]
    if audit["dcr"].get("share_subsampled_to") != size:
        raise _refuse(where, "dcr.share_subsampled_to is not the smaller set's published size")
    mia = audit["membership_inference"]
    if mia is not None:
        if (mia.get("n_members"), mia.get("n_nonmembers")) != (train, holdout) or not holdout:
            raise _refuse(
                where,
                "membership_inference.n_members / n_nonmembers are not the published "
                "training / held-out sizes",
            )
        if mia.get("fpr_resolution") != rounded(1.0 / holdout):
            raise _refuse(where, "membership_inference.fpr_resolution is not 1 / n_nonmembers")
    return {
        "train": most_train,
        "holdout": most_holdout,
        "share": min(most_train, most_holdout),
    }


def _check_windows(dcr: dict, volumes: int, where: str) -> None:
    """Of one series, the published quantiles' windows are identical or disjoint."""
    if volumes < MIN_RECORDS:
        return
    for prefix in ("train", "holdout", "nndr"):
        starts: list[int] = []
        for name in PRIORITY:
            if isinstance(dcr.get(f"{prefix}_{name}"), int | float):
                start = window_start(QUANTILES[name], volumes)
                if not _apart(start, starts):
                    raise _refuse(
                        where,
                        f"dcr.{prefix}_{name} and another quantile differ by fewer than "
                        f"{MIN_RECORDS} records ({RULE})",
                    )
                starts.append(start)


def check_shared(audit: dict, where: str) -> None:
    """Refuse an audit JSON that publishes more than the rule allows: a key outside the
    shared layout, a figure that is not rounded, or one the counts do not allow, a subject
    count not in its published form, or no cohort fingerprint. One line naming `where` and
    the field (FedsynthError)."""
    if not isinstance(audit.get("cohort_sha256"), str) or not _HEX64.fullmatch(
        audit["cohort_sha256"]
    ):
        raise FedsynthError(
            f"audit {where} names no audited cohort (cohort_sha256): audit the release with "
            "fedsynth audit --release"
        )
    _check_layout(audit, where)
    most = _check_counts(audit, where)
    volumes = audit["cohort_volumes"]
    dcr = audit["dcr"]
    enough = volumes >= MIN_RECORDS
    allowed = {
        f"{p}_{q}": enough and most[p] >= MIN_RECORDS
        for p in ("train", "holdout")
        for q in QUANTILES
    }
    allowed |= {f"nndr_{q}": allowed[f"train_{q}"] for q in ("q05", "median")}
    closer = dcr.get("closer_to_training_share")
    allowed["closer_to_training_share"] = (
        enough
        and most["share"] >= MIN_RECORDS
        and not (isinstance(closer, float) and small_count(closer, volumes))
    )
    fields = [(f"dcr.{key}", dcr.get(key), ok) for key, ok in allowed.items()]
    mia = audit["membership_inference"]
    if mia is not None:
        members, nonmembers = most["train"], most["holdout"]
        both = members >= MIN_RECORDS and nonmembers >= MIN_RECORDS
        fields += [
            (f"membership_inference.{k}", mia.get(k), both) for k in ("auc", "auc_uncalibrated")
        ]
        for key, target in FPR_TARGETS.items():
            tpr = mia.get(key)
            count_ok = not (isinstance(tpr, float) and small_count(tpr, mia["n_members"]))
            ok = both and target * nonmembers >= MIN_RECORDS and count_ok
            fields.append((f"membership_inference.{key}", tpr, ok))
    for name, value, ok in fields:
        if not _figure_ok(value, ok):
            raise _refuse(where, f"{name} is not a figure the site may share ({RULE})")
    _check_windows(dcr, volumes, where)
