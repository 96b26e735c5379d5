"""The subject count a site publishes, and what its Poisson rate is planned from.

Under the add/remove-one-subject relation a site's exact subject count n is not protected,
yet the FedAvg weight and the sample rate q = batch / n (both in clear, in the server's
ledger and privacy.json) would give it away. Poisson sampling need not use batch / n: a
site may sample each subject with any probability q, and the accountant at that q is
exact. So the site plans q = batch / m from a PUBLIC size m <= n (the expected batch q n
is then at least the study's batch) and weighs its update by m: q and the weight reveal m
only. m is, from the node config (client/node_config.py):
- `disclose-subject-count=true`: n itself (the site opted in);
- `public-subjects=M`: M, which must be at most n (else the site refuses, reason `config`);
- neither: n rounded down to two significant figures and to a multiple of 10
  (300 -> 300, 347 -> 340, 1234 -> 1200, 45 -> 40), and 1 below 10 subjects. A site of
  fewer than 10 subjects thus trains at q = 1 with weight 1 rather than refusing: a
  refusal would tell the server as much (fewer than 10), and a simulated node (Flower
  gives it only its partition id) could not opt in to train at all.

A site's own delta terms must hold for its real n, but a refusal that depends on n would
leak it a bit at a time (the server chooses delta per study), so they are checked against
`bound`: the largest count that publishes the same rounded size (349 for 347; n itself
when disclosed). A refusal then tells only what the rounding publishes anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedsynth.client.node_config import SiteSettings
from fedsynth.common.errors import FedsynthError
from fedsynth.common.subject_rounding import rounded_down, rounding_step


class PublicSizeAboveCount(FedsynthError):
    """The node config's public-subjects exceeds the site's real subject count."""


@dataclass(frozen=True)
class SubjectCount:
    """A site's subject count as it may be published. `real` never leaves the site."""

    real: int  # n
    public: int  # m <= n: the FedAvg weight and the size q is planned from
    bound: int  # >= n: the largest n publishing this m by default (delta checks use it)
    exact: bool  # m = n because the site opted in


def subject_bound(settings: SiteSettings, subjects: int) -> int:
    """The count a site's delta terms are checked against: n when it disclosed n, else
    the top of n's rounding bucket (349 for 347, 9 below 10), never below n."""
    if settings.disclose_subject_count:
        return subjects
    return rounded_down(subjects) + rounding_step(subjects) - 1


def subject_count(settings: SiteSettings, subjects: int) -> SubjectCount:
    """The count to publish for a site of `subjects` (n >= 1) subjects.

    Raises PublicSizeAboveCount when the declared public size exceeds n: its text names
    both numbers, so it goes to the site's own log only."""
    if subjects < 1:
        raise FedsynthError(f"a site of {subjects} subjects has nothing to train on")
    bound = subject_bound(settings, subjects)
    if settings.disclose_subject_count:
        return SubjectCount(subjects, subjects, bound, exact=True)
    if settings.public_subjects is not None:
        if settings.public_subjects > subjects:
            raise PublicSizeAboveCount(
                f"node config public-subjects={settings.public_subjects} exceeds the site's "
                f"{subjects} subjects: the published size must be at most the real count"
            )
        return SubjectCount(subjects, settings.public_subjects, bound, exact=False)
    return SubjectCount(subjects, max(1, rounded_down(subjects)), bound, exact=False)
