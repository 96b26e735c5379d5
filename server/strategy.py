"""The study's Flower strategy: FedAvg's fit step with the privacy ledger first.

Each round (Flower's legacy DefaultWorkflow; server/round_fit.py wraps its fit step):
1. READY (server/readiness.py) picks this round's sites before the fit workflow starts.
2. `configure_fit` sends the global weights of the trainable subset (`privacy.trainable`,
   in `keys` order; the frozen rest is the public checkpoint every site holds, checked
   there by `checkpoint-sha256`) and the study config to those sites; they answer DELTAS
   (trained - global) of those tensors, so SecAgg+ masks and the wire carries the subset.
3. `aggregate_fit` checks every reply (metrics, and in a plain round each site's arrays:
   server/reply_arrays.py), then writes the round's ledger lines
   (server/round_charges.py), then steps the server optimiser on the subject-weighted mean
   delta (server/aggregation.py) only if at least `federation.min-sites` sites trained
   (else the round is skipped with a line saying why), then saves the round checkpoint and
   hands it to validation (server/round_validation.py), which runs while the next round
   trains.
Under SecAgg+ every result's parameters are the same unmasked weighted mean (the workflow
replaced them); num_examples and metrics travel in clear, so the ledger is the same. The
mean is checked against what honest sites can produce (finite, within the clipping
range: server/reply_arrays.py) before any line is written; a round whose mean fails is
skipped (the sites spent: their lines stay; the model is unchanged).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import torch
from flwr.common import (
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
)
from flwr.server import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg

from fedsynth.common.checkpoint import public_sha256
from fedsynth.common.config import to_dict
from fedsynth.server.aggregation import as_tensors, subject_weighted_mean
from fedsynth.server.reply_arrays import aggregate_problem
from fedsynth.server.round_charges import Replies, charge_round, check_replies, log_failures
from fedsynth.server.round_validation import RoundValidation
from fedsynth.server.run_dir import record_round_time, round_dir, save_round, write_summary
from fedsynth.server.server_optimizer import ServerOptimizer
from fedsynth.server.site_identity import SiteNames
from fedsynth.server.study import Study

log = logging.getLogger(__name__)

NODE_WAIT_S = 120.0


class StudyStrategy(FedAvg):
    """One strategy for both paths: the plain default fit workflow and SecAgg+."""

    def __init__(
        self,
        study: Study,
        weights: dict[str, torch.Tensor],
        done: int,
        keys: list[str] | None = None,
        validation: RoundValidation | None = None,
    ) -> None:
        """`weights`: the global UNet state dict (the public checkpoint or the last round's);
        `done`: rounds already in the run dir; `keys`: the tensors that travel (the
        trainable subset; None: all). The others stay the public checkpoint's and are
        checked at each site by their SHA-256. `validation`: what validates each round's
        checkpoint (None: nothing)."""
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=1,
            min_evaluate_clients=1,
            min_available_clients=1,
        )
        self.study = study
        self.secure = bool(study.config.federation.secure_aggregation)
        self.weights = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
        self.keys = list(self.weights) if keys is None else list(keys)
        self.server_optimizer = ServerOptimizer(
            study.config.federation, {k: self.weights[k] for k in self.keys}
        )
        if done and self.server_optimizer.adam is not None:
            if self.server_optimizer.load(round_dir(study.run_dir, done)):
                log.info("server optimiser FedAdam: moments of round %d continued", done)
            else:
                log.info(
                    "server optimiser FedAdam: fresh moments (round %d saved none for these "
                    "tensors)",
                    done,
                )
        travelling = set(self.keys)
        frozen = [k for k in self.weights if k not in travelling]
        self.checkpoint_sha256 = public_sha256(study.checkpoint, self.weights, frozen)
        self.done = done
        self.validation = validation
        # node id -> site name, checked at READY against the run dir's bindings
        self.names = SiteNames(study.run_dir, simulated=study.phantoms is not None)
        self.picked: list[int] = []  # this round's sites, picked at READY
        self.chosen: list[int] = []
        self.secagg: dict[str, Any] | None = None  # this round's SecAgg+ parameters
        self.sent_weights: set[int] | None = None  # None: not tracked (no RoundFit)
        self.settled = 0  # the last workflow round aggregate_fit has written
        self.over = ""  # why the study ended before its planned rounds ("" while it runs)
        self.started = time.monotonic()
        self.round_started = time.time()  # this round's READY (RoundFit), Unix seconds
        self.study_text = json.dumps(to_dict(study.config))

    def _parameters(self) -> Parameters:
        return ndarrays_to_parameters([self.weights[k].numpy() for k in self.keys])

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters:
        return self._parameters()

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        if self.over:
            return []
        round_number = self.done + server_round
        if self.picked:  # the legacy client manager learns of the grid's nodes in a thread
            client_manager.wait_for(len(self.picked), timeout=int(NODE_WAIT_S))
        proxies = client_manager.all().values()
        by_node = {p.node_id: p for p in proxies}
        chosen = [by_node[n] for n in self.picked if n in by_node]
        need = self.study.config.federation.min_sites
        if len(chosen) < need:
            self.over = (
                f"before round {round_number}: {len(chosen)} of {len(proxies)} connected sites "
                f"are ready with budget left (federation.min-sites {need})"
            )
            log.warning("study ends %s", self.over)
            return []
        self.chosen = [p.node_id for p in chosen]
        log.info("round %d: %d sites", round_number, len(chosen))
        instruction = FitIns(
            self._parameters(),
            {
                "round": round_number,
                "study": self.study_text,
                "study-id": self.study.study_id,
                "keys": json.dumps(self.keys),
                "checkpoint-sha256": self.checkpoint_sha256,
                "checkpoint": str(self.study.checkpoint),
                "phantoms": str(self.study.phantoms or ""),
                "site-states": str(self.study.run_dir / "sites"),
                # 0: plain FedAvg; else the site checks its delta fits SecAgg+'s range
                "clipping-range": self.study.clipping_range if self.secure else 0.0,
                "max-weight": self.study.max_weight if self.secure else 0.0,
            },
        )
        return [(proxy, instruction) for proxy in chosen]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        study, round_number = self.study, self.done + server_round
        replies = time.time()
        log_failures(round_number, failures)
        travelling = {k: self.weights[k] for k in self.keys}
        good = check_replies(
            study,
            self.names,
            self.chosen,
            round_number,
            results,
            None if self.secure else travelling,
        )
        unusable = self._aggregate_problem([res for _, res in results], travelling) if good else ""
        silent = charge_round(study, self.names, round_number, good, self.chosen, self.sent_weights)
        trained = len(good)
        need = study.config.federation.min_sites
        skipped = ""
        if unusable:
            skipped = f"{unusable}: not what honest sites can send"
        elif trained < need:
            skipped = f"only {trained} site(s) trained, federation.min-sites is {need}"
        else:
            self._apply(good)
        if skipped:
            log.warning(
                "round %d not aggregated: %s; the model is unchanged", round_number, skipped
            )
        # the ledger lines above are on disk (fsync'd) before the round's model is saved
        facts = {
            "sites_trained": trained,
            "skipped": skipped or None,
            "secagg": self.secagg,
            "study_id": study.study_id,
        }
        save_round(study, round_number, self.weights, facts, self.server_optimizer.save)
        summary = write_summary(study, round_number)
        record_round_time(
            study, round_number, started=self.round_started, replies=replies, ended=time.time()
        )
        epsilons = ", ".join(f"{k} {v:.3g}" for k, v in summary["site_epsilon"].items())
        log.info(
            "round %d/%d: %d trained, %d no valid reply; epsilon %s; %.0f s",
            round_number,
            study.config.federation.rounds,
            trained,
            silent,
            epsilons,
            time.monotonic() - self.started,
        )
        if self.validation is not None:
            self.validation.later(round_number, self.weights)
        self.settled = server_round
        return self._parameters(), {}

    def _aggregate_problem(self, results: list[FitRes], travelling: dict[str, torch.Tensor]) -> str:
        """Under SecAgg+, why the unmasked mean the results carry cannot be applied ('' when
        it can; always '' in a plain round, whose replies were checked one by one). The
        parameters are the round's, which RoundFit set on the workflow (`self.secagg`): the
        quantisation step depends on the round's site count."""
        if not self.secure:
            return ""
        assert self.secagg is not None  # RoundFit sets it for every SecAgg+ round that ran
        return aggregate_problem(
            results,
            travelling,
            self.secagg["clipping_range"],
            self.secagg["quantization_range"],
            self.secagg["max_weight"],
        )

    def _apply(self, good: Replies) -> None:
        """Step the server optimiser on the round's mean delta (SecAgg+: the unmasked one
        every result carries)."""
        if self.secure:
            _, res = next(iter(good.values()))
            mean = as_tensors(self.keys, res.parameters)
        else:
            subjects = [reply.subjects for reply, _ in good.values()]
            deltas = (as_tensors(self.keys, res.parameters) for _, res in good.values())
            mean = subject_weighted_mean(subjects, deltas)
        self.server_optimizer.step(self.weights, mean)
