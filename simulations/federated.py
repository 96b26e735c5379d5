"""Federated finetuning in one process, for studies: the sites' own DP-SGD, then FedAvg.

A study compares many finetunes (DP against none, one site against all, epsilon 1 against
10), which through `flwr run` would each cost a SuperLink, a ClientApp per stage and a
ledger. Here each round trains every site with the trainer a real site runs
(`client.dp_trainer.train_round`, from the global weights and, as
`training.finetune-optimizer-state` says, the optimiser moments the site kept from its
previous round; its own Poisson sampling and secure-mode noise) and adds the
subject-weighted mean of their deltas (server/aggregation.py, as a `flwr run` round does)
through the server optimiser (`federation.server-optimizer`). A site's noise multiplier is
planned once for the whole study, as a site that trains every round plans it
(`client.budget`): the target epsilon over rounds x local steps at its sample rate;
`private=False` trains the same steps with noise 0 (still clipped), the non-private
reference of the same computation.

What differs from `flwr run`: no SecAgg+ (its quantisation changes a delta by at most
clipping range / 2^bits per value), no ledger files and no refusals; a study that needs
those runs `flwr run`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedsynth.client.budget import sample_rate
from fedsynth.client.dp_trainer import GivenGradients, train_round
from fedsynth.client.latents import SiteLatents, site_latents
from fedsynth.common.accountant import plan_noise
from fedsynth.common.checkpoint import Pretrained
from fedsynth.common.config import Config
from fedsynth.server.aggregation import subject_weighted_mean
from fedsynth.server.server_optimizer import ServerOptimizer

log = logging.getLogger(__name__)

Weights = dict[str, torch.Tensor]
Evaluate = Callable[[Weights], dict[str, float]]


def load_sites(
    pretrained: Pretrained, phantoms: Path, names: list[str], state_root: Path
) -> dict[str, SiteLatents]:
    """Each named site folder of `phantoms` encoded once by the public autoencoder and
    cached under `state_root`/NAME (owner-only, as at a real site); a progress bar while
    a site is checked and encoded (minutes for 300-subject sites)."""
    return {
        name: site_latents(pretrained, pretrained.folder, phantoms / name, state_root / name)
        for name in names
    }


def subset(site: SiteLatents, subjects: int) -> SiteLatents:
    """The site's first `subjects` subjects (all their volumes)."""
    keep = site.subjects < subjects
    return SiteLatents(site.latents[keep], site.attributes[keep], site.subjects[keep])


def noise_multiplier(config: Config, subjects: int, private: bool = True) -> float:
    """What a site of `subjects` subjects plans for the whole study (0 when not private)."""
    if not private:
        return 0.0
    privacy = config.privacy
    steps = config.federation.rounds * privacy.local_steps
    return plan_noise(
        privacy.target_epsilon,
        privacy.delta,
        sample_rate(privacy, subjects),
        steps,
        privacy.accountant,
    )


@dataclass
class FederatedRun:
    """The global weights after the last round and each round's evaluation (round 0: the
    starting weights)."""

    weights: Weights
    history: list[dict[str, float]] = field(default_factory=list)
    noise: dict[str, float] = field(default_factory=dict)  # site -> noise multiplier
    seconds: float = 0.0  # wall time of the DP-SGD, all sites and rounds


def federate(
    config: Config,
    start: Weights,
    unet: torch.nn.Module,
    sites: Mapping[str, SiteLatents],
    *,
    private: bool = True,
    evaluate: Evaluate | None = None,
    seed: int = 0,
    label: str = "",
    given: Mapping[str, GivenGradients] | None = None,
) -> FederatedRun:
    """`config.federation.rounds` rounds of every site in `sites` from `start`.

    `unet` is the ConditionedUNet the sites train (its weights are overwritten). Each site's
    round is seeded from (seed, round, site) so that two calls with one seed differ only in
    what the call changes. `evaluate(weights)` runs before round 1 and after each round.
    Progress is logged, one line per round, prefixed by `label`. `given`: per site, the
    privacy audit's canaries, counted among its subjects (simulations/dp_audit.py).
    """
    given = given or {}
    counts = {
        name: site.n_subjects + (given[name].size if name in given else 0)
        for name, site in sites.items()
    }
    weights = {k: v.detach().clone() for k, v in start.items()}
    noise = {name: noise_multiplier(config, counts[name], private) for name in sites}
    run = FederatedRun(weights, noise=noise)
    server = ServerOptimizer(config.federation, weights)
    keeps = config.training.finetune_optimizer_state == "keep"
    kept: dict[str, dict] = {}  # site -> its optimiser state, as client/optimizer_state.py
    if evaluate is not None:
        run.history.append(evaluate(weights))
    for round_number in range(1, config.federation.rounds + 1):
        started, deltas = time.perf_counter(), []
        for k, (name, site) in enumerate(sites.items()):
            unet.load_state_dict(weights)
            result = train_round(
                unet,
                site.latents,
                site.attributes,
                site.subjects,
                config,
                noise[name],
                sample_rate(config.privacy, counts[name]),
                config.privacy.local_steps,
                seed=seed * 1_000_003 + round_number * 1009 + k,
                given=given.get(name),
                optimizer_state=kept.get(name),
            )
            if keeps:
                kept[name] = result.optimizer_state
            trained = unet.state_dict()
            deltas.append({key: trained[key] - weights[key] for key in weights})
        subjects = list(counts.values())
        server.step(weights, subject_weighted_mean(subjects, deltas))
        run.seconds += time.perf_counter() - started
        if evaluate is not None:
            run.history.append(evaluate(weights))
        log.info(
            "%sround %d/%d (%.0f s)", label, round_number, config.federation.rounds, run.seconds
        )
    run.weights = weights
    return run
