"""A round's replies checked, then charged: the server's ledger lines for the round.

Every reply is checked first, its metrics (server/site_replies.py) and in a plain round
its arrays (server/reply_arrays.py), so one malformed reply never leaves a round's ledger
half written nor reaches the global model; then the lines are written: each trained
site's spend, the rounds its own history holds that the server's ledger lacks, and, for
every site that was sent the global weights and gave no valid reply, the most it could
have spent (replaced by the site's own line when it next reports). All before the
round's model is saved.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch
from flwr.common import FitRes
from flwr.server.client_proxy import ClientProxy

from fedsynth.common.ledger import read_ledger
from fedsynth.common.protocol import REASONS, code_of
from fedsynth.server.privacy_ledger import (
    append_line,
    charge_estimate,
    compare_reported,
    reconcile,
)
from fedsynth.server.reply_arrays import check_reply_arrays
from fedsynth.server.run_dir import LEDGER
from fedsynth.server.site_identity import SiteNames
from fedsynth.server.site_replies import (
    BadReply,
    TrainedReply,
    accountable,
    check_key,
    check_signed,
    trained_reply,
)
from fedsynth.server.study import Study

log = logging.getLogger(__name__)

Replies = dict[int, tuple[TrainedReply, FitRes]]  # node -> its checked reply and result


def log_failures(
    round_number: int, failures: Iterable[tuple[ClientProxy, FitRes] | BaseException]
) -> None:
    """One line per failed site, with its reason code only: a site's error text stays there."""
    for failure in failures:
        code = code_of(str(failure if isinstance(failure, BaseException) else failure[1]))
        log.warning("round %d: a site failed: %s", round_number, REASONS[code])


def check_replies(
    study: Study,
    names: SiteNames,
    chosen: list[int],
    round_number: int,
    results: Iterable[tuple[ClientProxy, FitRes]],
    weights: Mapping[str, torch.Tensor] | None,
) -> Replies:
    """The usable replies of this round's `chosen` nodes, every one checked before any
    ledger line; an unusable one is logged with the check it failed and counts as none.

    `weights`: the travelling global tensors, in order, which a plain reply's arrays must
    match (server/reply_arrays.py); None under SecAgg+, where every result carries the
    same unmasked aggregate, which the strategy checks once (`aggregate_problem`)."""
    privacy = study.config.privacy
    ledger = read_ledger(study.run_dir / LEDGER)  # nothing is written while replies are checked
    good: Replies = {}
    for proxy, res in results:
        node = proxy.node_id
        try:
            if node not in chosen or node in good:
                raise BadReply("a reply from a node that was not sent this round")
            reply = trained_reply(
                res.metrics,
                res.num_examples,
                names[node],
                privacy.delta,
                privacy.accountant,
            )
            segments = [reply.segment, *(s for _, s in reply.history)]
            accountable(segments, privacy.delta, privacy.accountant)
            check_signed(reply.signed, reply.history, reply.site, study.study_id, privacy)
            check_key(ledger, reply.site, reply.signed.key, names.identity(node))
            reply.own_row(round_number)
            if weights is not None:
                check_reply_arrays(res.parameters, weights)
        except (KeyError, TypeError, ValueError) as error:  # BadReply is a ValueError
            log.warning(
                "round %d: %s sent a reply the server cannot use: %s",
                round_number,
                names.describe(node),
                error,
            )
            continue
        good[node] = (reply, res)
    return good


def charge_round(
    study: Study,
    names: SiteNames,
    round_number: int,
    good: Replies,
    chosen: list[int],
    sent_weights: set[int] | None,
) -> int:
    """Ledger lines for this round: replies, missed history, estimates for the rest.

    `sent_weights`: the nodes the global weights reached (None: not tracked, every chosen
    node counts as sent); a chosen node they never reached cannot have trained and is not
    charged. Returns how many sites were charged an estimate."""
    for node, (reply, _) in good.items():
        identity = names.identity(node)  # the one its name was bound to at READY
        own = reply.signed.extra(reply.history, reply.own_row(round_number))
        append_line(
            study, round_number, reply.site, reply.segment, "trained", identity=identity, **own
        )
        missed = reconcile(study, reply.site, reply.history, identity=identity, signed=reply.signed)
        if missed:
            log.info("%s: charged %d round(s) from its own ledger", reply.site, missed)
        compare_reported(study, reply.site, reply.epsilon)
    silent = 0
    for node in chosen:
        never_sent = sent_weights is not None and node not in sent_weights
        if node not in good and not never_sent:
            site = names[node]
            log.warning(
                "round %d: no valid reply from %s: charged the most it could have spent "
                "(replaced by its own ledger's line when it reports)",
                round_number,
                site,
            )
            charge_estimate(study, round_number, site, identity=names.identity(node))
            silent += 1
    return silent
