"""One round's fit step: READY, then the fit workflow (plain or SecAgg+), then the ledger.

`RoundFit` wraps Flower's fit workflow: READY first (server/readiness.py), every SecAgg+
parameter (threshold, quantisation range) set on the workflow for the sites really ready
and recorded as the round's, the grid watched for which nodes the global weights reached,
and `aggregate_fit` called with nothing when the workflow halted (SecAgg+ with too few
sites left), so that the round still gets its ledger lines (estimates) and its
checkpoint. Once the study is over, rounds do nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, cast

from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
from flwr.serverapp import Grid

from fedsynth.common.errors import FedsynthError
from fedsynth.server.readiness import ready_sites
from fedsynth.server.secure_aggregation import secagg_settings
from fedsynth.server.strategy import NODE_WAIT_S, StudyStrategy

log = logging.getLogger(__name__)


class WeightsSentTo:
    """The grid, recording which nodes were sent the global weights (a fit instruction):
    only those can have trained, so only those are charged when they give no valid reply
    (a SecAgg+ round that halts before its masked-vector stage trained nobody)."""

    def __init__(self, grid: Grid, nodes: set[int]) -> None:
        self._grid, self.nodes = grid, nodes

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        for message in messages:
            train = message.metadata.message_type == MessageType.TRAIN
            if train and any(len(r) for r in message.content.array_records.values()):
                self.nodes.add(message.metadata.dst_node_id)
        return self._grid.send_and_receive(messages, timeout=timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class RoundFit:
    """The fit step of Flower's DefaultWorkflow for one study round (see module)."""

    def __init__(self, fit: Callable[[Grid, Context], None], strategy: StudyStrategy) -> None:
        self.fit, self.strategy = fit, strategy

    def __call__(self, grid: Grid, context: Context) -> None:
        strategy = self.strategy
        if strategy.over:
            return
        server_round = context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND]
        assert isinstance(server_round, int)  # Flower's DefaultWorkflow sets it
        round_number = strategy.done + server_round
        strategy.round_started = time.time()
        wait_for_nodes(grid, strategy.study.config.federation.sites_per_round)
        strategy.picked = ready_sites(
            grid, strategy.study, strategy.names, round_number, strategy.study_text
        )
        sites = len(strategy.picked)
        strategy.secagg = None
        if isinstance(self.fit, SecAggPlusWorkflow) and sites >= 2:
            # every parameter for this round's sites (the workflow reads them at its setup
            # stage): a threshold set for more sites than are ready would halt the round
            # after they spent, and the quantisation range depends on the site count
            settings = secagg_settings(strategy.study, sites)
            for name, value in settings.items():
                setattr(self.fit, name, value)
            # exactly what the workflow runs with: stated in privacy.json, and the step of
            # the server's check of the unmasked aggregate (StudyStrategy.aggregate_fit)
            strategy.secagg = {**settings, "sites": sites}
        strategy.sent_weights = set()
        # a Grid by duck typing: every other attribute is the real grid's
        self.fit(cast(Grid, WeightsSentTo(grid, strategy.sent_weights)), context)
        if strategy.settled != server_round and not strategy.over:
            log.warning("round %d: aggregation halted", round_number)
            strategy.aggregate_fit(server_round, [], [])


def wait_for_nodes(grid: Grid, wanted: int) -> None:
    """Wait up to NODE_WAIT_S for `wanted` connected nodes (fewer: go on with those).
    Raises FedsynthError when none connected."""
    deadline = time.monotonic() + NODE_WAIT_S
    while len(list(grid.get_node_ids())) < wanted and time.monotonic() < deadline:
        time.sleep(1.0)
    if not list(grid.get_node_ids()):
        raise FedsynthError(f"no site connected within {NODE_WAIT_S:.0f} s")
