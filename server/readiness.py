"""READY: which connected sites will train this round, asked before the round starts.

Every connected site is asked (a Flower query message; the site reads no data) whether it
will train under the study's terms; it answers with its name, a fixed reason code and its
own ledger history. All answers are checked before anything is written; then each claimed
name is checked against the identity it is bound to (server/site_identity.py: a node
whose claim does not hold is refused in one warning line, not picked, and nothing is
written for it; the study goes on), rounds the server never heard of are charged from
the histories of the claims that hold (server/privacy_ledger.py), and this round's sites
are picked: ready, with budget left by the server's own ledger, those trained least
first. Knowing them before SecAgg+ starts keeps a site that will not train from adding a
zero update to the masked sum.
"""

from __future__ import annotations

import logging
from collections import Counter

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid

from fedsynth.common.ledger import read_ledger
from fedsynth.common.protocol import READY_RECORD, REASONS, code_of
from fedsynth.server.privacy_ledger import compare_reported, reconcile, site_is_spent
from fedsynth.server.run_dir import LEDGER
from fedsynth.server.site_identity import SiteNames, node_identity
from fedsynth.server.site_replies import (
    BadReply,
    ReadyReply,
    accountable,
    check_key,
    check_signed,
    ready_reply,
)
from fedsynth.server.study import Study

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0


def ready_sites(
    grid: Grid, study: Study, names: SiteNames, round_number: int, study_text: str
) -> list[int]:
    """Send READY to every connected node; returns the nodes of the sites that will train
    and (by the server's ledger) have budget left, at most `federation.sites-per-round`,
    those trained least first. `study_text`: the study config as JSON (what each site
    checks against its terms)."""
    identities = {int(info.node_id): node_identity(info) for info in grid.get_nodes()}
    nodes = sorted(identities)
    content: dict[str, int | str] = {
        "round": round_number,
        "study": study_text,
        "study-id": study.study_id,
        "phantoms": str(study.phantoms or ""),
        "site-states": str(study.run_dir / "sites"),
    }
    messages = [
        Message(
            RecordDict({READY_RECORD: ConfigRecord(dict(content))}),
            dst_node_id=node,
            message_type=MessageType.QUERY,
            group_id=str(round_number),
        )
        for node in nodes
    ]
    replies = list(grid.send_and_receive(messages, timeout=READY_TIMEOUT_S))
    checked: list[tuple[int, ReadyReply]] = []
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            reason = REASONS[code_of(reply.error.reason or "")]
            log.info("round %d: node %d did not answer READY: %s", round_number, node, reason)
            continue
        try:
            record = reply.content.config_records[READY_RECORD]
            answer = ready_reply(dict(record), names.get(node))
            privacy = study.config.privacy
            accountable([s for _, s in answer.history], privacy.delta, privacy.accountant)
            checked.append((node, answer))
        except (KeyError, TypeError, ValueError) as error:  # BadReply is a ValueError
            log.warning("round %d: node %d sent a malformed READY (%s)", round_number, node, error)
    claims = [(node, identities[node], answer.site) for node, answer in checked]
    held = names.claim(round_number, claims, grid.run.run_id)  # all checked: now written
    # read once: reconcile below appends only the lines of the name it reconciles, and
    # check_key reads only the lines of its own name, which the claim made unique
    ledger = read_ledger(study.run_dir / LEDGER)
    ready = []
    for node, answer in checked:
        if node not in held:
            continue
        try:  # the name is this node's: its history must be signed, with the key its
            # earlier lines carry
            privacy = study.config.privacy
            check_signed(answer.signed, answer.history, answer.site, study.study_id, privacy)
            check_key(ledger, answer.site, answer.signed.key, names.identity(node))
        except BadReply as error:
            log.warning("round %d: %s is not used: %s", round_number, answer.site, error)
            continue
        missed = reconcile(
            study, answer.site, answer.history, identity=names.identity(node), signed=answer.signed
        )
        if missed:
            log.info("%s: charged %d round(s) from its own ledger", answer.site, missed)
        compare_reported(study, answer.site, answer.epsilon)
        if answer.ready:
            ready.append(node)
        else:
            reason = REASONS[answer.code]
            log.info("round %d: %s will not train: %s", round_number, answer.site, reason)
    return pick(study, names, ready)


def pick(study: Study, names: SiteNames, ready: list[int]) -> list[int]:
    """Ready sites with budget left (server's ledger), those trained least first, at most
    sites-per-round: this round's sites, fixed before the fit workflow starts."""
    ledger = read_ledger(study.run_dir / LEDGER)
    config = study.config
    usable = [n for n in ready if not site_is_spent(ledger, names[n], config)]
    trained = Counter(e["site"] for e in ledger if e["status"] == "trained")
    usable.sort(key=lambda n: (trained[names[n]], n))
    return usable[: config.federation.sites_per_round]
