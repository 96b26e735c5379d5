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
  smallest or largest at the ends), published when M >= 11, the set's published size is
  at least 11 (nndr: the training set's; withheld there, never null), those 11 volumes'
  nearest subjects are 11 distinct subjects and its window is identical to or disjoint from the
  window of every quantile of the same series already published (in the order median,
  q25, q05);
- the closer-to-training share (a mean over all M volumes and subsampled sets): published
  when M >= 11, share_subsampled_to (the smaller set's published size) is at least 11
  and the volumes' nearest
  subjects include at least 11 distinct ones in each set;
- the membership attack's ROC AUC (over all members x non-members): published when the
  published n_members and n_nonmembers are at least 11; a TPR at a false-positive rate f
  rests on the threshold set by the f n_nonmembers highest-scoring non-members, so it is
  published only when f x the published n_nonmembers >= 11 (and n_members >= 11);
- a rate that is a count over a published total (a TPR over the members, the share over
  the volumes) is withheld when that count, or the rest of the total, may be 1 to 10
  (TPR 0.02 of 50 members is one patient flagged);
- the 95% interval of the AUC or of a TPR (`*_ci95_low`, `*_ci95_high`): withheld with
  the figure (in its words), else computed from the published figure and the published
  sizes alone (`shared_intervals`: the AUC +- 1.96 Hanley & McNeil standard errors, the
  Clopper-Pearson interval of round(TPR x n_members) of n_members), its bounds rounded
  outward to 2 significant digits; an interval from the exact counts would tell them
  apart within their public size (10 and 15 members give different widths), one from
  the published ones adds nothing to what is published. The published size is at most
  the real count, so the shared interval is at least as wide as the exact one;
- the notes `fpr_not_resolvable` and `few_subjects` (`attack_notes`) read the published
  sizes alone, as fpr_resolution does.
Every such decision is taken on what is published, never on a private count: a gate on
the exact count would be a published bit about it (10 and 15 subjects both publish 10,
and an AUC withheld for 10 but shown for 15 would tell them apart). A published subject
count m stands for every count consistent with it (`count_range`: m itself when exact,
m and up when declared, its rounding bucket [m, m + step - 1] when rounded, 1 to 9 for
1), and a published rate for every rate that rounds to it; a figure is withheld when any
of them would be withheld. So a set's "at least 11" reads its published size (a bucket's
least count is m), a TPR's threshold f x n_nonmembers the published held-out size, and
a rate's small-count test every count over every total in the range (`small_count`).
The one gate not on a count of the site's subjects is the distinct nearest subjects
behind a quantile's window or the share: it is a property of the figure itself (how
many records it rests on), taken only once the published sizes allow the figure.
Set sizes: the cohort's volumes, the seed and the loss draws are published as they are.
The site's subject counts (training_subjects = n_members, holdout_subjects = n_nonmembers,
share_subsampled_to, and fpr_resolution = 1 / n_nonmembers) are published as the site's
public size, the rule of client/public_size.py, recorded in `subject_counts`: "rounded"
(n rounded down to two significant figures and a multiple of 10, 1 below 10), "declared"
(the training set's size as the site declared it, --public-subjects; held-out rounded) or
"exact" (the site opted in, --disclose-subject-count).

check_shared refuses a shared audit with any key outside this layout (nested too), a
figure the published counts do not allow (the same worst case), an interval or a note
other than the one the published figures and sizes give, a null nndr, or a count not in
its published form: one line naming the field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import TypeGuard

import numpy as np
from scipy.stats import beta

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
    f"{MIN_RECORDS - 1} of any count its published total stands for; subject counts are "
    "the site's public sizes, which alone decide what is withheld; otherwise withheld"
)
QUANTILES = {"q05": 0.05, "q25": 0.25, "median": 0.5}
PRIORITY = ("median", "q25", "q05")  # which of two overlapping quantiles is published
FPR_TARGETS = {"tpr_at_1pct_fpr": 0.01, "tpr_at_0_1pct_fpr": 0.001}
FPR_WORDS = {"tpr_at_1pct_fpr": "1%", "tpr_at_0_1pct_fpr": "0.1%"}
CALIBRATED = "mean over timestep bands of log(reference loss / model loss)"
SCORES = (CALIBRATED, "-model loss")
CONFIDENCE = 0.95  # of the intervals of the AUC and the TPRs
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
CI_KEYS = {key: (f"{key}_ci95_low", f"{key}_ci95_high") for key in ("auc", *FPR_TARGETS)}
INTERVALS = (
    "95%: AUC +- 1.96 standard errors (Hanley & McNeil 1982, eq. 2), clipped to [0, 1]; "
    "TPR: Clopper-Pearson on the members, at the threshold found on the non-members (not "
    "counting that threshold's own uncertainty); shared bounds are computed from the shared "
    "figure and sizes and rounded outward"
)
FEW_FOR_ATTACK = 30  # members or non-members below this: the attack's figures mean little
SUBJECT_COUNTS = ("rounded", "declared", "exact")  # how the site's counts are published
_HEX64 = re.compile(r"[0-9a-f]{64}")

Published = float | str  # a rounded figure or "withheld: fewer than ..."


def withheld(what: str) -> str:
    """The text of a field below the minimum, e.g. withheld("synthetic volumes")."""
    return f"{WITHHELD} {MIN_RECORDS} {what}"


def rounded(value: float) -> float:
    """`value` to SIGNIFICANT_DIGITS significant digits (0.043217 -> 0.043)."""
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def rounded_outward(low: float, high: float) -> tuple[float, float]:
    """An interval's bounds to SIGNIFICANT_DIGITS significant digits, `low` rounded down and
    `high` up (0.0434 -> 0.043, 0.0436 -> 0.044 as a high bound), so it still covers."""

    def bound(value: float, rounding: str) -> float:
        if value == 0:
            return 0.0
        exact = Decimal(repr(value))
        step = Decimal(1).scaleb(exact.adjusted() - SIGNIFICANT_DIGITS + 1)
        return float(exact.quantize(step, rounding=rounding))

    return bound(low, ROUND_FLOOR), bound(high, ROUND_CEILING)


def auc_interval(auc: float, members: int, nonmembers: int) -> tuple[float, float]:
    """The AUC's 95% interval: AUC +- 1.96 SE, clipped to [0, 1], the SE of Hanley & McNeil
    1982 (Radiology 143:29, eq. 2: Q1 = A / (2 - A), Q2 = 2 A^2 / (1 + A)) over `members`
    x `nonmembers`. It is 0 at an AUC of 0 or 1."""
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    variance = (
        auc * (1 - auc) + (members - 1) * (q1 - auc**2) + (nonmembers - 1) * (q2 - auc**2)
    ) / (members * nonmembers)
    half = Z95 * math.sqrt(max(variance, 0.0))
    return max(auc - half, 0.0), min(auc + half, 1.0)


def clopper_pearson(k: int, n: int) -> tuple[float, float]:
    """The exact 95% interval of a proportion k of n (Clopper & Pearson 1934, Biometrika
    26:404): the 2.5% quantile of Beta(k, n - k + 1) and the 97.5% of Beta(k + 1, n - k),
    0 for k = 0 and 1 for k = n. 0 of 20: [0, 0.168]."""
    tail = (1 - CONFIDENCE) / 2
    low = 0.0 if k == 0 else float(beta.ppf(tail, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - tail, k + 1, n - k))
    return low, high


def attack_notes(members: int, nonmembers: int) -> dict[str, str | None]:
    """What the set sizes leave the attack's figures worth, in words (None: nothing to say):
    `fpr_not_resolvable` names the FPRs below the smallest non-zero one, 1 / nonmembers
    (there a TPR is the TPR at zero false positives), `few_subjects` a side below
    FEW_FOR_ATTACK subjects."""
    below = [f"{FPR_WORDS[key]} FPR" for key, f in FPR_TARGETS.items() if 1 / nonmembers > f]
    few = [
        f"{count} {side}"
        for side, count in (("members", members), ("non-members", nonmembers))
        if count < FEW_FOR_ATTACK
    ]
    return {
        "fpr_not_resolvable": (
            f"not resolvable: the TPR at {' and at '.join(below)}; with {nonmembers} "
            f"non-members the smallest non-zero FPR is 1/{nonmembers} = {1 / nonmembers:.2g}, "
            "so a TPR there is the TPR at zero false positives"
            if below
            else None
        ),
        "few_subjects": (
            f"fewer than {FEW_FOR_ATTACK} subjects on a side ({' and '.join(few)}): the "
            "AUC and TPRs mean little"
            if few
            else None
        ),
    }


def count_range(published: int, mode: str) -> tuple[int, float]:
    """Every subject count a published count may stand for (client/public_size.py's rule),
    as (least, most): "exact" itself, "declared" m and up (a declared size is at most the
    real count), "rounded" its bucket [m, m + step - 1] (1 to 9 for 1). The least is m."""
    if mode == "exact":
        return published, published
    if mode == "declared":
        return published, math.inf
    if published == 1:
        return 1, 9
    return published, published + rounding_step(published) - 1


def _rate_interval(rate: float) -> tuple[Decimal, Decimal]:
    """The rates in [0, 1] that round to `rate` as published (SIGNIFICANT_DIGITS), closed:
    0.043 stands for 0.0425 to 0.0435; 1.0 for 0.995 to 1 (below a power of ten the
    digits are a tenth as wide)."""
    r = Decimal(repr(rounded(rate)))
    if r == 0:
        return r, r
    half = Decimal(5).scaleb(r.adjusted() - SIGNIFICANT_DIGITS)
    below = half / 10 if r == Decimal(1).scaleb(r.adjusted()) else half
    return max(r - below, Decimal(0)), min(r + half, Decimal(1))


def _may_be_small(least: Decimal, most: Decimal) -> bool:
    """Whether the real interval [least, most] of counts holds one of 1 to MIN_RECORDS - 1."""
    first = max(math.ceil(least), 1)
    return first <= MIN_RECORDS - 1 and first <= most


def small_count(rate: float, total: int, most: float | None = None) -> bool:
    """Whether a rate as published (`rate` rounded to SIGNIFICANT_DIGITS) of a total of
    `total` to `most` records (None: exactly `total`; math.inf: unbounded) may be, or
    leave, a cell of 1 to MIN_RECORDS - 1 records: the worst case over every total in the
    range and every rate that rounds to the published one."""
    low, high = _rate_interval(rate)
    least = Decimal(total)
    top = least if most is None else Decimal(most)  # Decimal(math.inf) is Infinity

    def times(share: Decimal, count: Decimal) -> Decimal:
        return Decimal(0) if share == 0 else share * count

    return _may_be_small(times(low, least), times(high, top)) or _may_be_small(
        times(1 - high, least), times(1 - low, top)
    )


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
    set_size: int | None,
    names: Sequence[str] = tuple(QUANTILES),
) -> dict:
    """{prefix_NAME} for NAME in `names`: shareable quantiles of one series, a quantile
    whose window overlaps a published one's without being it withheld. `set_size`: the
    published size of the subjects the distances are to (None: no such set, fields None);
    below MIN_RECORDS every field is withheld, values or not (nndr has none below 2
    subjects, which its size already withholds). `subjects` (M,): the volumes' nearest
    subjects, given even without values, so that fewer than MIN_RECORDS volumes withhold
    with the same words whatever the set's real size."""
    if set_size is None:
        return {f"{prefix}_{name}": None for name in names}
    if subjects is not None and len(subjects) < MIN_RECORDS:
        return {f"{prefix}_{name}": withheld("synthetic volumes") for name in names}
    if set_size < MIN_RECORDS:
        return {f"{prefix}_{name}": withheld("subjects in the set as published") for name in names}
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
    `subjects_per_set`: share_subsampled_to as published (the smaller set's public size,
    the least count it stands for); `distinct`: the fewest distinct nearest subjects of
    the volumes in either set."""
    if value is None or subjects_per_set is None:
        return None
    if volumes < MIN_RECORDS:
        return withheld("synthetic volumes")
    if subjects_per_set < MIN_RECORDS:
        return withheld("subjects per set as published")
    if distinct < MIN_RECORDS:
        return withheld("distinct nearest subjects in a set")
    if small_count(value, volumes):
        return withheld("volumes on one side of the share")
    return rounded(value)


def attack(
    metrics: dict,
    members: int | None = None,
    nonmembers: int | None = None,
    mode: str = "rounded",
) -> dict:
    """The membership attack's figures as shared: AUCs and TPRs rounded or withheld, the
    set sizes as published (`members`, `nonmembers`: the public sizes, published by
    `mode`, the held-out one rounded when the training one is declared; None: exact).
    Every decision reads the published sizes and figures only (see the module docstring)."""
    if members is None or nonmembers is None:
        members, nonmembers, mode = metrics["n_members"], metrics["n_nonmembers"], "exact"
    out = dict(metrics) | {"n_members": members, "n_nonmembers": nonmembers}
    most_members = count_range(members, mode)[1]
    few = members < MIN_RECORDS or nonmembers < MIN_RECORDS
    for key in ("auc", "auc_uncalibrated"):
        if metrics.get(key) is not None:
            out[key] = withheld("members or non-members") if few else rounded(metrics[key])
    for key, target in FPR_TARGETS.items():
        out[key] = _tpr(metrics[key], target, members, most_members, nonmembers)
    out |= shared_intervals(out, members, nonmembers) | attack_notes(members, nonmembers)
    out["fpr_resolution"] = rounded(1.0 / nonmembers)
    return out


def shared_intervals(mia: dict, members: int, nonmembers: int) -> dict[str, Published | None]:
    """The 95% interval bounds of the shared AUC and TPRs (CI_KEYS), from the shared
    figures in `mia` and the published sizes alone: auc_interval, clopper_pearson of
    round(TPR x members) of `members`, rounded outward; a withheld figure's bounds are
    withheld in its words, a missing one's None."""
    out: dict[str, Published | None] = {}
    for key, names in CI_KEYS.items():
        figure = mia.get(key)
        bounds: tuple[Published | None, Published | None] = (figure, figure)
        if _rate(figure):
            exact = (
                auc_interval(figure, members, nonmembers)
                if key == "auc"
                else clopper_pearson(round(figure * members), members)
            )
            bounds = rounded_outward(*exact)
        out |= dict(zip(names, bounds, strict=True))
    return out


def _tpr(tpr: float, target: float, members: int, most: float, nonmembers: int) -> Published:
    """A TPR at FPR `target` as shared, from the published sizes: `members` (stands for
    up to `most`) and `nonmembers` (the least held-out count it stands for)."""
    if members < MIN_RECORDS:
        return withheld("members")
    if target * nonmembers < MIN_RECORDS:  # non-members above the threshold at that FPR
        return withheld(f"non-members above the threshold ({target:g} x {nonmembers})")
    if small_count(tpr, members, most):
        return withheld("members flagged, or not flagged, at that FPR")
    return rounded(tpr)


# ------------------------------------------------------- the check of a shared audit

DCR_KEYS = frozenset(
    {f"{p}_{q}" for p in ("train", "holdout") for q in QUANTILES}
    | {"closer_to_training_share", "share_subsampled_to", "nndr_q05", "nndr_median"}
)
NOTES = ("fpr_not_resolvable", "few_subjects")
MIA_KEYS = frozenset(
    {"score", "auc", "auc_uncalibrated", *FPR_TARGETS, "fpr_resolution", "loss_draws"}
    | {"n_members", "n_nonmembers", "loss_bands", "intervals", *NOTES}
    | {name for names in CI_KEYS.values() for name in names}
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
    integers = (
        ("seed", audit.get("seed")),
        *((k, _get(audit, k)) for k in ("loss_draws", "loss_bands")),
    )
    for name, value in integers:
        if value is not None and not _is_int(value):
            raise _refuse(where, f"{name} is not an integer")
    if audit["membership_inference"] is not None and _get(audit, "score") not in SCORES:
        raise _refuse(where, "membership_inference.score is not one of the audit's scores")
    if _get(audit, "intervals") not in (None, INTERVALS):
        raise _refuse(where, "membership_inference.intervals is not the audit's text")


def _get(audit: dict, key: str) -> object:
    mia = audit.get("membership_inference")
    return mia.get(key) if isinstance(mia, dict) else None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _rate(value: object) -> TypeGuard[float]:
    """A finite number (a figure the small-count test reads), not a bool or text."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _figure_ok(value: object, allowed: bool) -> bool:
    """A shared figure: None, withheld, or (where the counts allow one) a rounded number."""
    if value is None or (isinstance(value, str) and value.startswith(WITHHELD)):
        return True
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return allowed and math.isfinite(value) and rounded(float(value)) == value


def _subject_range(audit: dict, key: str, where: str) -> tuple[int, float] | None:
    """A published subject count and the most subjects it may stand for (count_range);
    None for a held-out set not given. Refuses a count not in the form `subject_counts`
    says."""
    mode, value = audit["subject_counts"], audit.get(key)
    if value is None and key == "holdout_subjects":
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _refuse(where, f"{key} is not a subject count")
    if mode == "declared" and key == "holdout_subjects":
        mode = "rounded"  # --public-subjects declares the training set's size only
    if mode == "rounded" and public_count(value) != value:
        raise _refuse(
            where,
            f"{key} is not a public size (rounded down to two significant figures and a "
            "multiple of 10) though subject_counts is not exact: an undisclosed count",
        )
    return count_range(value, mode)


def _check_counts(audit: dict, where: str) -> tuple[tuple[int, float], tuple[int, float] | None]:
    """The published set sizes agree with each other and `subject_counts`; returns the
    training and held-out sets' (published, most) counts."""
    if audit.get("subject_counts") not in SUBJECT_COUNTS:
        raise _refuse(where, f"subject_counts is not one of {', '.join(SUBJECT_COUNTS)}")
    if not _is_int(audit.get("cohort_volumes")):
        raise _refuse(where, "cohort_volumes is not a count")
    train = _subject_range(audit, "training_subjects", where)
    assert train is not None  # only the held-out set may be absent
    holdout = _subject_range(audit, "holdout_subjects", where)
    size = None if holdout is None else min(train[0], holdout[0])
    if audit["dcr"].get("share_subsampled_to") != size:
        raise _refuse(where, "dcr.share_subsampled_to is not the smaller set's published size")
    mia = audit["membership_inference"]
    if mia is not None:
        if holdout is None or (mia.get("n_members"), mia.get("n_nonmembers")) != (
            train[0],
            holdout[0],
        ):
            raise _refuse(
                where,
                "membership_inference.n_members / n_nonmembers are not the published "
                "training / held-out sizes",
            )
        if mia.get("fpr_resolution") != rounded(1.0 / holdout[0]):
            raise _refuse(where, "membership_inference.fpr_resolution is not 1 / n_nonmembers")
        for key, note in attack_notes(train[0], holdout[0]).items():
            if mia.get(key) not in (None, note):
                raise _refuse(
                    where, f"membership_inference.{key} is not the note the published sizes give"
                )
    return train, holdout


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
    shared layout, a figure that is not rounded, or one the published counts do not allow
    (the same worst case over every count they stand for as the audit's own decision), a
    subject count not in its published form, or no cohort fingerprint. One line naming `where` and
    the field (FedsynthError)."""
    if not isinstance(audit.get("cohort_sha256"), str) or not _HEX64.fullmatch(
        audit["cohort_sha256"]
    ):
        raise FedsynthError(
            f"audit {where} names no audited cohort (cohort_sha256): audit the release with "
            "fedsynth audit --release"
        )
    _check_layout(audit, where)
    train, holdout = _check_counts(audit, where)
    volumes = audit["cohort_volumes"]
    dcr = audit["dcr"]
    enough = volumes >= MIN_RECORDS
    least = {"train": train[0], "holdout": 0 if holdout is None else holdout[0]}
    allowed = {
        f"{p}_{q}": enough and least[p] >= MIN_RECORDS
        for p in ("train", "holdout")
        for q in QUANTILES
    }
    allowed |= {f"nndr_{q}": allowed[f"train_{q}"] for q in ("q05", "median")}
    closer = dcr.get("closer_to_training_share")
    allowed["closer_to_training_share"] = (
        enough
        and (dcr.get("share_subsampled_to") or 0) >= MIN_RECORDS
        and not (_rate(closer) and small_count(closer, volumes))
    )
    fields = [(f"dcr.{key}", dcr.get(key), ok) for key, ok in allowed.items()]
    mia = audit["membership_inference"]
    if mia is not None and holdout is not None:
        both = train[0] >= MIN_RECORDS and holdout[0] >= MIN_RECORDS
        fields += [
            (f"membership_inference.{k}", mia.get(k), both) for k in ("auc", "auc_uncalibrated")
        ]
        for key, target in FPR_TARGETS.items():
            tpr = mia.get(key)
            count_ok = not (_rate(tpr) and small_count(tpr, *train))
            ok = both and target * holdout[0] >= MIN_RECORDS and count_ok
            fields.append((f"membership_inference.{key}", tpr, ok))
    for name, value, ok in fields:
        if not _figure_ok(value, ok):
            raise _refuse(where, f"{name} is not a figure the site may share ({RULE})")
    if mia is not None and holdout is not None:
        for key, bound in shared_intervals(mia, train[0], holdout[0]).items():
            if mia.get(key) not in (None, bound):
                raise _refuse(
                    where,
                    f"membership_inference.{key} is not the interval of the shared figure and "
                    f"sizes ({RULE})",
                )
    _check_windows(dcr, volumes, where)
    if any(dcr.get(f"nndr_{q}") is None for q in ("q05", "median")):
        raise _refuse(
            where, "dcr.nndr_q05 / nndr_median is null: that tells fewer than 2 training subjects"
        )
