"""What crosses between a site and the server, and nothing more.

Everything here travels in clear (under SecAgg+ too: only the weight delta is masked), so
it is the complete list of what a site discloses besides its DP-SGD update: the subject
count (FedAvg weight, also implied by the sample rate), the DP-SGD spend of each round
(noise multiplier, sample rate, steps) and its own ledger of such spends with the site's
signature of each line and its public signing key (common/spend_signature.py), its name,
and a fixed reason code when it does not train. No paths, values, counts or exception texts
computed from site data: a site logs those locally (`site.log` in its state dir).

A round has two messages per site:
1. READY (a Flower `query` message, before any secure aggregation starts): the server
   asks whether the site will train round R under the study's terms; the site answers
   from its node config and its own ledger alone, without touching data. Only sites that
   answer `ready` are sent the round, so a site that will not train is known before the
   SecAgg+ round starts and never contributes a zero update to a masked sum.
2. TRAIN (Flower `train`, plain or SecAgg+): the weight delta plus REPLY_METRICS.
"""

from __future__ import annotations

READY_RECORD = "fedsynth.ready"  # the ConfigRecord name of the READY query and its reply

# the metrics a trained reply carries (the server refuses a reply with any other key)
REPLY_METRICS = frozenset(
    {
        "site",
        "noise_multiplier",
        "sample_rate",
        "steps",
        "subjects",
        "delta",
        "accountant",
        "history",
        "signed",
        "epsilon",
    }
)
# what a READY reply carries
READY_METRICS = frozenset({"site", "ready", "code", "history", "signed", "epsilon"})

# reason codes: the only thing about a refusal or failure that leaves a site
REASONS = {
    "ready": "the site will train this round",
    "budget-spent": "the site's privacy budget is spent",
    "terms": "the study's plan breaks the site's own privacy terms (see its node config)",
    "failed-before": "the site failed in an earlier round after spending; an operator must "
    "clear it at the site",
    "config": "the site's node config is incomplete or invalid",
    "data": "the site's data cannot be used for training",
    "update": "the site's update cannot be sent (not finite, or outside the secure "
    "aggregation range)",
    "plan-changed": "the site's plan for this round differs from the one it declared",
    "model": "the site's public checkpoint or trainable subset differs from the server's",
    "internal": "the site failed; details are in the site's own log",
}


class SiteStop(Exception):
    """A site does not train or reply; `str()` is the fixed text that may leave the site.

    Flower sends a ClientApp exception's text to the server, so this is the only exception
    a ClientApp lets out: `fedsynth:<code>: <fixed sentence>`.
    """

    def __init__(self, code: str) -> None:
        self.code = code if code in REASONS else "internal"
        super().__init__(f"fedsynth:{self.code}: {REASONS[self.code]}")


def code_of(text: str) -> str:
    """The reason code in a site's error text (`internal` when it carries none)."""
    marker = "fedsynth:"
    if marker in text:
        code = text.split(marker, 1)[1].split(":", 1)[0]
        if code in REASONS:
            return code
    return "internal"
