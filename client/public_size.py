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
leak it a bit at a time (the server chooses delta per study). So:
- by default they are checked against `bound`: the largest count that publishes the same
  rounded size (349 for 347). A refusal then tells only what the rounding publishes anyway;
- with `public-subjects` the site must state `max-delta` (client/node_config.py), and a
  study's delta is checked against max-delta alone (client/site_terms.py check_terms).
  That max-delta is below 1/n is checked here, locally, once the site knows n: when it is
  not, the site refuses every study alike (reason `config`, before anything is spent),
  whatever delta the study asks for. An answer then never depends on the study and n
  together, so choosing deltas tells the server nothing of n; `bound` is n, which a
  delta at most max-delta < 1/n never reaches;
- with `disclose-subject-count`, n itself (published anyway).

What still shows n beyond m, seen by the server (under SecAgg+ the update only summed):
- the update's scale. DP-SGD divides the noisy sum of about q n clipped gradients by q m
  (client/dp_trainer.py), so its signal is about n / m times that of a site of m subjects.
  With the plain `sgd` finetune optimizer the update's size reveals n / m (AdamW normalises
  it away, mostly). This leaves only through DP-SGD's output, so it is covered by the
  site's epsilon, but it is not hidden by m. The same holds for the secure aggregation
  range check (client/client_app.py): an update larger than the clipping range stops the
  site after its round is spent and recorded (reason `update`, `failed.json` written), a
  post-processing of the DP-SGD output. It is not predicted before spending: that
  prediction would need n and so leak it outside DP-SGD. A site whose m is far below n
  (public-subjects=1, or fewer than 10 subjects by default: m = 1, so q = 1 and every step
  trains on all n subjects) should finetune with AdamW or keep m close to n;
- the round's wall time, which grows with q n (the subjects each step trains on): the
  coordinator sees when each site's reply arrives.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedsynth.client.node_config import SiteSettings
from fedsynth.common.errors import FedsynthError
from fedsynth.common.subject_rounding import rounded_down, rounding_step


class DeclaredSizeRefused(FedsynthError):
    """The node config's public-subjects does not fit the site's real subject count; its
    text names the count, so it goes to the site's own log only (reason `config`)."""


class PublicSizeAboveCount(DeclaredSizeRefused):
    """The node config's public-subjects exceeds the site's real subject count."""


class MaxDeltaAboveCount(DeclaredSizeRefused):
    """A site declaring its size has no max-delta, or one not below 1/n for its real n."""


@dataclass(frozen=True)
class SubjectCount:
    """A site's subject count as it may be published. `real` never leaves the site."""

    real: int  # n
    public: int  # m <= n: the FedAvg weight and the size q is planned from
    bound: int  # >= n: what delta is checked against (the top of n's bucket by default)
    exact: bool  # m = n because the site opted in


def subject_bound(settings: SiteSettings, subjects: int) -> int:
    """The count a site's delta terms are checked against: n when it disclosed n or
    declared its size (its max-delta is then below 1/n: check_declared_size), else the top
    of n's rounding bucket (349 for 347, 9 below 10), never below n."""
    if settings.disclose_subject_count or settings.public_subjects is not None:
        return subjects
    return rounded_down(subjects) + rounding_step(subjects) - 1


def check_declared_size(settings: SiteSettings, subjects: int) -> None:
    """For a site that declares public-subjects: the declared size is at most n and
    max-delta is below 1/n, so that a study's delta at most max-delta is safe for n and
    the site's answers depend on its node config alone. Study-independent: a site that
    fails it refuses every study alike.

    Raises PublicSizeAboveCount or MaxDeltaAboveCount (texts name n: site log only)."""
    declared, max_delta = settings.public_subjects, settings.max_delta
    if declared is None:
        return
    if declared > subjects:
        raise PublicSizeAboveCount(
            f"node config public-subjects={declared} exceeds the site's "
            f"{subjects} subjects: the published size must be at most the real count"
        )
    if max_delta is None or max_delta >= 1 / subjects:
        raise MaxDeltaAboveCount(
            f"node config public-subjects={declared} needs a max-delta below 1/n = "
            f"{1 / subjects:.3g} for the site's {subjects} subjects"
            + ("" if max_delta is None else f", not {max_delta:g}")
            + ": the site refuses every study until it is lowered"
        )


def subject_count(settings: SiteSettings, subjects: int) -> SubjectCount:
    """The count to publish for a site of `subjects` (n >= 1) subjects.

    Raises DeclaredSizeRefused (check_declared_size) when a declared public size does not
    fit n: its text names n, so it goes to the site's own log only."""
    if subjects < 1:
        raise FedsynthError(f"a site of {subjects} subjects has nothing to train on")
    bound = subject_bound(settings, subjects)
    if settings.disclose_subject_count:
        return SubjectCount(subjects, subjects, bound, exact=True)
    if settings.public_subjects is not None:
        check_declared_size(settings, subjects)
        return SubjectCount(subjects, settings.public_subjects, bound, exact=False)
    return SubjectCount(subjects, max(1, rounded_down(subjects)), bound, exact=False)
