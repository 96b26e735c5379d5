"""The round loop: READY query, then FedAvg of deltas (plain or SecAgg+), ledger first.

Each round (Flower's legacy DefaultWorkflow; `RoundFit` wraps its fit step):
1. READY: every connected site is asked (a Flower query message, no data touched at the
   site) whether it will train this round under the study's terms; it answers with its
   name, a reason code and its own ledger history. The server binds each name to its
   node (two nodes claiming one name end the study), charges rounds it never heard of
   from the histories (server/privacy_ledger.py) and keeps the sites that are ready and,
   by its own ledger, have budget left. Fewer than `federation.min-sites`: the study ends.
2. Train (StudyStrategy.configure_fit / aggregate_fit): the global weights of the
   trainable subset (`privacy.trainable`, in `keys` order; the frozen rest is the public
   checkpoint every site holds, checked there by `checkpoint-sha256`) and the study config go
   to the ready sites, least trained first; sites answer DELTAS (trained - global) of
   those tensors, so SecAgg+ masks and the wire carries the subset only. All replies are
   checked first (server/site_replies.py), then the ledger lines are written (trained,
   reported history, and an estimate for every site that was sent the round without a
   valid reply), then the round is aggregated only if at least min-sites sites trained
   (else skipped with a line saying why), then the round checkpoint. Public validation
   (and a simulation's site-domain loss) of that checkpoint then runs on a thread of its
   own while the next round trains: sites never wait for it.
Under SecAgg+ every result's parameters are the same unmasked weighted mean (the workflow
replaced them); num_examples and metrics travel in clear, so the ledger is the same.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import (
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import ClientManager, LegacyContext
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
from flwr.serverapp import Grid

from fedsynth.common.checkpoint import load_pretrained, public_sha256
from fedsynth.common.config import to_dict
from fedsynth.common.errors import FedsynthError
from fedsynth.common.feature_net import load_feature_nets
from fedsynth.common.io import atomic_write_text
from fedsynth.common.ledger import read_ledger
from fedsynth.common.models import resolve_device
from fedsynth.common.protocol import READY_RECORD, REASONS, code_of
from fedsynth.server.privacy_ledger import (
    append_line,
    charge_estimate,
    compare_reported,
    reconcile,
    site_is_spent,
)
from fedsynth.server.run_dir import (
    LEDGER,
    RECONSTRUCTION_PNG,
    SITE_DOMAIN_FIDELITY,
    record_round_time,
    round_dir,
    save_round,
    validation_dir,
    write_summary,
)
from fedsynth.server.secure_aggregation import secagg_settings
from fedsynth.server.server_optimizer import ServerOptimizer
from fedsynth.server.site_replies import (
    BadReply,
    TrainedReply,
    accountable,
    ready_reply,
    trained_reply,
)
from fedsynth.server.study import Study
from fedsynth.server.validation import SiteDomain, Validator, validation_text

NODE_WAIT_S = 120.0
READY_TIMEOUT_S = 120.0


def mean_delta(updates: list[tuple[Parameters, int]]) -> list[np.ndarray]:
    """Subject-weighted mean of the sites' deltas (float64); sites with weight 0 left out."""
    updates = [(p, n) for p, n in updates if n > 0]
    total = sum(n for _, n in updates)
    out: list[np.ndarray] | None = None
    for parameters, n in updates:
        arrays = parameters_to_ndarrays(parameters)
        scaled = [a.astype(np.float64) * (n / total) for a in arrays]
        out = scaled if out is None else [o + s for o, s in zip(out, scaled, strict=True)]
    return out or []


def _say(text: str) -> None:
    print(f"[fedsynth] {text}", flush=True)


class StudyStrategy(FedAvg):
    """One strategy for both paths: the plain default fit workflow and SecAgg+."""

    def __init__(
        self,
        study: Study,
        weights: dict[str, torch.Tensor],
        done: int,
        keys: list[str] | None = None,
    ) -> None:
        """`weights`: the global UNet state dict (the public checkpoint or the last round's);
        `keys`: the tensors that travel (the trainable subset; None: all). The others stay
        the public checkpoint's and are checked at each site by their SHA-256."""
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
                _say(f"server optimiser FedAdam: moments of round {done} continued")
            else:
                _say(
                    f"server optimiser FedAdam: fresh moments (round {done} saved none for "
                    "these tensors)"
                )
        travelling = set(self.keys)
        frozen = [k for k in self.weights if k not in travelling]
        self.checkpoint_sha256 = public_sha256(study.checkpoint, self.weights, frozen)
        self.done = done
        self.picked: list[int] = []  # this round's sites, picked at READY (see `pick`)
        self.chosen: list[int] = []
        self.secagg: dict[str, Any] | None = None  # this round's SecAgg+ parameters
        self.sent_weights: set[int] | None = None  # None: not tracked (no RoundFit)
        self.settled = 0  # the last workflow round aggregate_fit has written
        self.over = ""  # why the study ended before its planned rounds ("" while it runs)
        self.started = time.monotonic()
        self.round_started = time.time()  # this round's READY (RoundFit), Unix seconds
        self.site_of: dict[int, str] = {}  # node id -> site name, bound at READY
        self.study_text = json.dumps(to_dict(study.config))
        self.validator = self.site_domain = None
        self._validation: ThreadPoolExecutor | None = None  # see validate_later
        if study.validation is not None:
            self.validator = Validator(study.checkpoint, study.validation, study.config)
        if study.site_domain is not None:  # a simulation's phantom sites only
            pretrained = (
                self.validator.pretrained
                if self.validator is not None
                else load_pretrained(study.checkpoint, resolve_device(study.config.device))
            )
            self.public_weights = {k: v.clone() for k, v in pretrained.unet.state_dict().items()}
            self.site_domain = SiteDomain(pretrained, study.site_domain, study.config)

    def _parameters(self) -> Parameters:
        return ndarrays_to_parameters([self.weights[k].numpy() for k in self.keys])

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters:
        return self._parameters()

    # -- READY -------------------------------------------------------------------------
    def bind(self, node: int, site: str, connected: set[int]) -> None:
        """Bind a site name to its (authenticated) node: two connected nodes with one name
        end the study; a node that is gone (a restarted SuperNode gets a new id) hands its
        name over."""
        for other, name in list(self.site_of.items()):
            if name == site and other != node:
                if other in connected:
                    raise FedsynthError(
                        f"two nodes ({other} and {node}) claim the site name {site!r}: each "
                        "SuperNode needs its own site-name in its node config (one server "
                        "ledger per site)"
                    )
                _say(f"{site} is now node {node} (node {other} is gone)")
                del self.site_of[other]
        self.site_of[node] = site

    def ask_ready(self, grid: Grid, round_number: int) -> None:
        """Send READY to every connected site; keep those that will train (see module)."""
        nodes = sorted(grid.get_node_ids())
        content = {
            "round": round_number,
            "study": self.study_text,
            "study-id": self.study.study_id,
            "phantoms": str(self.study.phantoms or ""),
            "site-states": str(self.study.run_dir / "sites"),
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
        checked = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                reason = REASONS[code_of(reply.error.reason)]
                _say(f"round {round_number}: node {node} did not answer READY: {reason}")
                continue
            try:
                record = reply.content.config_records[READY_RECORD]
                answer = ready_reply(dict(record), self.site_of.get(node))
                privacy = self.study.config.privacy
                accountable([s for _, s in answer.history], privacy.delta, privacy.accountant)
                checked.append((node, answer))
            except (KeyError, TypeError, ValueError) as error:  # BadReply is a ValueError
                _say(f"round {round_number}: node {node} sent a malformed READY ({error})")
        for node, answer in checked:  # all checked before anything is written
            self.bind(node, answer.site, set(nodes))
        ready = []
        for node, answer in checked:
            missed = reconcile(self.study, answer.site, answer.history)
            if missed:
                _say(f"{answer.site}: charged {missed} round(s) from its own ledger")
            compare_reported(self.study, answer.site, answer.epsilon)
            if answer.ready:
                ready.append(node)
            else:
                _say(f"round {round_number}: {answer.site} will not train: {REASONS[answer.code]}")
        self.picked = self.pick(ready)

    def pick(self, ready: list[int]) -> list[int]:
        """Ready sites with budget left (server's ledger), those trained least first, at
        most sites-per-round: this round's sites, fixed before the fit workflow starts."""
        ledger = read_ledger(self.study.run_dir / LEDGER)
        config = self.study.config
        usable = [n for n in ready if not site_is_spent(ledger, self.site_of[n], config)]
        trained = Counter(e["site"] for e in ledger if e["status"] == "trained")
        usable.sort(key=lambda n: (trained[self.site_of[n]], n))
        return usable[: config.federation.sites_per_round]

    # -- train -------------------------------------------------------------------------
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
            _say(f"study ends {self.over}")
            return []
        self.chosen = [p.node_id for p in chosen]
        _say(f"round {round_number}: {len(chosen)} sites")
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

    def _check_replies(
        self, round_number: int, results: list[tuple[ClientProxy, FitRes]]
    ) -> dict[int, tuple[TrainedReply, FitRes]]:
        """Every reply checked before any ledger line: node -> (reply, result)."""
        privacy = self.study.config.privacy
        good: dict[int, tuple[TrainedReply, FitRes]] = {}
        for proxy, res in results:
            node = proxy.node_id
            try:
                if node not in self.chosen or node in good:
                    raise BadReply("a reply from a node that was not sent this round")
                reply = trained_reply(
                    res.metrics,
                    res.num_examples,
                    self.site_of[node],
                    privacy.delta,
                    privacy.accountant,
                )
                segments = [reply.segment, *(s for _, s in reply.history)]
                accountable(segments, privacy.delta, privacy.accountant)
            except (KeyError, TypeError, ValueError) as error:  # BadReply is a ValueError
                site = self.site_of.get(node, f"node {node}")
                _say(f"round {round_number}: {site} sent a reply the server cannot use: {error}")
                continue
            good[node] = (reply, res)
        return good

    def _charge(self, round_number: int, good: dict[int, tuple[TrainedReply, FitRes]]) -> int:
        """Ledger lines for this round: replies, missed history, estimates for the rest."""
        for reply, _ in good.values():
            append_line(self.study, round_number, reply.site, reply.segment, "trained")
            missed = reconcile(self.study, reply.site, reply.history)
            if missed:
                _say(f"{reply.site}: charged {missed} round(s) from its own ledger")
            compare_reported(self.study, reply.site, reply.epsilon)
        silent = 0
        for node in self.chosen:
            never_sent = self.sent_weights is not None and node not in self.sent_weights
            if node not in good and not never_sent:
                site = self.site_of[node]
                _say(
                    f"round {round_number}: no valid reply from {site}: charged the most it "
                    "could have spent (replaced by its own ledger's line when it reports)"
                )
                charge_estimate(self.study, round_number, site)
                silent += 1
        return silent

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        study, round_number = self.study, self.done + server_round
        replies = time.time()
        for failure in failures:  # only the reason code: a site's error text stays there
            code = code_of(str(failure if isinstance(failure, BaseException) else failure[1]))
            _say(f"round {round_number}: a site failed: {REASONS[code]}")
        good = self._check_replies(round_number, results)
        silent = self._charge(round_number, good)
        trained = len(good)
        need = study.config.federation.min_sites
        skipped = ""
        if trained >= need:
            self._apply(good)
        else:
            skipped = f"only {trained} site(s) trained, federation.min-sites is {need}"
            _say(f"round {round_number} not aggregated: {skipped}; the model is unchanged")
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
        _say(
            f"round {round_number}/{study.config.federation.rounds}: {trained} trained, "
            f"{silent} no valid reply; epsilon {epsilons}; "
            f"{time.monotonic() - self.started:.0f} s"
        )
        self.validate_later(round_number)
        self.settled = server_round
        return self._parameters(), {}

    def _apply(self, good: dict[int, tuple[TrainedReply, FitRes]]) -> None:
        """Step the server optimiser on the round's mean delta (SecAgg+: the unmasked one
        every result carries)."""
        updates = [(res.parameters, reply.subjects) for reply, res in good.values()]
        delta = parameters_to_ndarrays(updates[0][0]) if self.secure else mean_delta(updates)
        changes = {
            key: torch.from_numpy(np.asarray(value, np.float64))
            for key, value in zip(self.keys, delta, strict=True)
        }
        self.server_optimizer.step(self.weights, changes)

    def site_domain_fidelity(self, round_number: int) -> None:
        """Simulation only, at the end of a study: samples of the public checkpoint and of
        round `round_number` against each site's held-out volumes (validation/FIDELITY)."""
        if self.site_domain is None or round_number < 1:
            return
        nets = load_feature_nets(self.study.checkpoint)
        _say("site-domain fidelity (simulation only): sampling the public and the final model")
        result = {
            "0": self.site_domain.public_fidelity(self.public_weights, nets),
            str(round_number): self.site_domain.fidelity(self.weights, nets),
        }
        path = validation_dir(self.study) / SITE_DOMAIN_FIDELITY
        atomic_write_text(path, json.dumps(result, indent=2) + "\n")
        for site, final in result[str(round_number)].items():
            start = result["0"][site]
            _say(
                f"{site} Frechet distance to held-out volumes (3D features): public checkpoint "
                f"{start['frechet_3d']:.3f}, round {round_number} {final['frechet_3d']:.3f}"
            )

    def validate(self, round_number: int, weights: dict[str, torch.Tensor] | None = None) -> dict:
        """Held-out public loss and montage, and (simulation only) site-domain losses of
        `weights` (None: the current global weights); kept next to the round's checkpoint.
        Returns the round's entry ({} when neither)."""
        if self.validator is None and self.site_domain is None:
            return {}
        weights = self.weights if weights is None else weights
        folder = validation_dir(self.study)
        entry: dict[str, Any] = {"round": round_number}
        if self.validator is not None:
            entry["loss"] = self.validator(weights, folder / f"round-{round_number:03d}.png")
            if round_number == 0:  # the frozen autoencoder alone, to compare samples with
                png = folder / RECONSTRUCTION_PNG
                entry["reconstruction_mae"] = self.validator.reconstruction(png)
        if self.site_domain is not None:
            entry["site_domain"] = self.site_domain.loss(weights)
        atomic_write_text(folder / f"round-{round_number:03d}.json", json.dumps(entry) + "\n")
        return entry

    def validate_later(self, round_number: int) -> None:
        """Validate this round's weights (a copy) on the validation thread, while the next
        round trains: the sites never wait for the server's validation. Rounds are
        validated in order, each logged when done; `finish_validation` waits for all."""
        if self.validator is None and self.site_domain is None:
            return
        if self._validation is None:
            self._validation = ThreadPoolExecutor(1, thread_name_prefix="fedsynth-validation")
        weights = {k: v.clone() for k, v in self.weights.items()}
        self._validation.submit(self._validate_and_say, round_number, weights)

    def _validate_and_say(self, round_number: int, weights: dict[str, torch.Tensor]) -> None:
        if self.study.phantoms is not None:  # simulated sites train on this machine's cores
            # one core for this thread's torch work (OpenMP's setting is per thread; the
            # main thread keeps its own for round 0 and the end-of-study fidelity)
            torch.set_num_threads(1)
        try:
            validated = validation_text(self.validate(round_number, weights))
        except Exception as error:  # validation informs; the round is saved and charged
            _say(f"round {round_number} validation failed: {type(error).__name__}: {error}")
            return
        _say(f"round {round_number} validation: {validated}")

    def finish_validation(self, cancel: bool = False) -> None:
        """Wait for every queued round's validation (each logs its own result or failure);
        `cancel` (the study is failing): drop those not started, wait only for the one
        running."""
        if self._validation is not None:
            self._validation.shutdown(wait=True, cancel_futures=cancel)
            self._validation = None


class _WeightsSentTo:
    """The grid, recording which nodes were sent the global weights (a fit instruction):
    only those can have trained, so only those are charged when they give no valid reply
    (a SecAgg+ round that halts before its masked-vector stage trained nobody)."""

    def __init__(self, grid: Grid, nodes: set[int]) -> None:
        self._grid, self.nodes = grid, nodes

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for message in messages:
            train = message.metadata.message_type == MessageType.TRAIN
            if train and any(len(r) for r in message.content.array_records.values()):
                self.nodes.add(message.metadata.dst_node_id)
        return self._grid.send_and_receive(messages, timeout=timeout)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


class RoundFit:
    """READY, then a fit workflow (plain or SecAgg+), then aggregate_fit with nothing if
    the workflow halted (SecAgg+ too few sites left) so that the round still gets its
    ledger lines (estimates) and its checkpoint. Once the study is over, rounds do nothing."""

    def __init__(self, fit: Any, strategy: StudyStrategy) -> None:
        self.fit, self.strategy = fit, strategy

    def __call__(self, grid: Grid, context: LegacyContext) -> None:
        strategy = self.strategy
        if strategy.over:
            return
        server_round = int(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        round_number = strategy.done + server_round
        strategy.round_started = time.time()
        _wait_for_nodes(grid, strategy.study.config.federation.sites_per_round)
        strategy.ask_ready(grid, round_number)
        sites = len(strategy.picked)
        strategy.secagg = None
        if isinstance(self.fit, SecAggPlusWorkflow) and sites >= 2:
            # the threshold of this round's sites, never below min-sites: a threshold set
            # for more sites than are ready would halt the round after they spent
            settings = secagg_settings(strategy.study, sites)
            self.fit.reconstruction_threshold = settings["reconstruction_threshold"]
            strategy.secagg = {**settings, "sites": sites}
        strategy.sent_weights = set()
        self.fit(_WeightsSentTo(grid, strategy.sent_weights), context)
        if strategy.settled != server_round and not strategy.over:
            _say(f"round {round_number}: aggregation halted")
            strategy.aggregate_fit(server_round, [], [])


def _wait_for_nodes(grid: Grid, wanted: int) -> None:
    """Wait up to NODE_WAIT_S for `wanted` connected nodes (fewer: go on with those)."""
    deadline = time.monotonic() + NODE_WAIT_S
    while len(list(grid.get_node_ids())) < wanted and time.monotonic() < deadline:
        time.sleep(1.0)
    if not list(grid.get_node_ids()):
        raise FedsynthError(f"no site connected within {NODE_WAIT_S:.0f} s")
