"""One finetune of a study (an *arm*) and the context every arm of a study shares.

An arm says which phantom sites train, how many subjects each, at which epsilon (None: the
same steps without noise), what is trained and from where (the public checkpoint or a
fresh UNet). `StudyContext.run` federates it in process (simulations/federated.py) and
measures the simulation-only site-domain loss on every site's held-out subjects after
each round. Its result is kept in the cache, keyed by everything it depends on, so studies
that share an arm (dp-gap's DP arm is the federation study's federated arm) run it once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fedsynth.client.latents import SiteLatents, site_latents
from fedsynth.common.checkpoint import UNET, file_sha256, load_pretrained, load_torch, save_torch
from fedsynth.common.config import (
    Config,
    apply_overrides,
    config_from_dict,
    fingerprint_dict,
    pretraining_hash,
    to_dict,
)
from fedsynth.common.feature_net import feature_net_path, load_feature_nets
from fedsynth.common.io import atomic_write_text
from fedsynth.common.models import ConditionedUNet
from fedsynth.server.study import DEFAULT_PHANTOM_SUBJECTS, DEFAULT_PUBLIC_SUBJECTS, cache_dir
from fedsynth.simulations.canaries import AuditPlan
from fedsynth.simulations.ceiling import CeilingPlan, finetune_ceiling, plan_facts
from fedsynth.simulations.federated import Weights, federate, load_sites, subset
from fedsynth.simulations.site_domain import SITE_DOMAIN_DRAWS, SiteDomain
from fedsynth.simulations.study_data import simulated_data

log = logging.getLogger(__name__)

ARM_VERSION = 1  # bump when what an arm computes changes: cached results are then rerun
STARTS = ("public", "scratch")
LATER_FIELDS: dict = {"learning_rate": None, "overrides": ()}  # Arm fields added later


@dataclass(frozen=True)
class StudySetup:
    """What a study is run with: the config, phantom site size and seeds, and where it
    writes the figures it draws from models (dp-gap's montages; None: none); how the
    ceiling trains and how dp-audit audits."""

    config: Config
    subjects: int = DEFAULT_PHANTOM_SUBJECTS
    seeds: tuple[int, ...] = (0,)
    public_subjects: int = DEFAULT_PUBLIC_SUBJECTS
    figures: Path | None = None
    ceiling: CeilingPlan = CeilingPlan()  # how long the non-private ceiling trains
    audit: AuditPlan = AuditPlan()


@dataclass(frozen=True)
class Arm:
    """One federated finetune. sites: folder names that train; epsilon: each site's target
    (None: no noise, still clipped); subjects: per site (None: the setup's); trainable:
    `privacy.trainable` (None: the config's); start: "public" (the checkpoint) or "scratch"
    (a UNet initialised from the seed); pooled: the sites' subjects as one site (central DP
    on pooled data, the same per-subject epsilon, the same sample rate); learning_rate:
    the sites' AdamW rate; overrides: further (key, value) config changes, as `-c`."""

    sites: tuple[str, ...]
    epsilon: float | None
    subjects: int | None = None
    trainable: str | None = None
    start: str = "public"
    pooled: bool = False
    learning_rate: float | None = None  # None: the config's finetuning rate
    overrides: tuple[tuple[str, float | int | str], ...] = ()

    def __post_init__(self) -> None:
        if self.start not in STARTS:
            raise ValueError(f"start must be one of {STARTS}, got {self.start!r}")

    @property
    def label(self) -> str:
        eps = "no noise" if self.epsilon is None else f"eps {self.epsilon:g}"
        parts = ["pooled " if self.pooled else "", "+".join(self.sites), f", {eps}"]
        if self.subjects is not None:
            parts.append(f", {self.subjects} subjects")
        if self.trainable is not None:
            parts.append(f", {self.trainable}")
        if self.start != "public":
            parts.append(f", from {self.start}")
        if self.learning_rate is not None:
            parts.append(f", lr {self.learning_rate:.2g}")
        parts.extend(f", {key}={value}" for key, value in self.overrides)
        return "".join(parts)


class StudyContext:
    """The simulation's data, public checkpoint, encoded sites and site-domain check, loaded
    once for all arms of a study. Arm results go to `cache`/studies/arms."""

    def __init__(self, setup: StudySetup) -> None:
        self.setup, config = setup, setup.config
        self.cache = cache_dir(config)
        self.data = simulated_data(config, self.cache, setup.subjects, setup.public_subjects)
        self.pretrained = load_pretrained(self.data.checkpoint)
        self.names = [f"site-{k}" for k in range(1, config.federation.sites + 1)]
        state = self.cache / "studies" / "sites" / self.data.phantoms.name
        self.sites = load_sites(self.pretrained, self.data.phantoms, self.names, state)
        self.site_domain = SiteDomain(self.pretrained, self.data.held_out, config)
        self.public = {k: v.clone() for k, v in self.pretrained.unet.state_dict().items()}
        self.arms = self.cache / "studies" / "arms"
        self.checkpoint_sha = file_sha256(self.pretrained.folder / UNET)  # part of every key

    def config_for(self, arm: Arm) -> Config:
        """The setup's config with the arm's epsilon and trainable subset (the whole UNet
        with functorch's per-sample gradients, faster than hooks there); a pooled arm's
        expected batch is the sites' together (the same sample rate as each site's); an arm
        from scratch learns at `training.pretrain-learning-rate` (the finetuning rate, set
        for few steps on a trained network, makes a random one diverge). An arm whose sites
        learn at another rate than the config's has FedAdam's rate scaled by the same
        factor: FedAdam moves each weight by about its rate per round, as the sites' AdamW
        moves it by about theirs per step, so the server would otherwise undo the arm's
        choice (FedAvg's rate is a multiple of the sites' step and stays)."""
        config = self.setup.config
        overrides: dict = {}
        if arm.epsilon is not None:
            overrides["privacy.target-epsilon"] = arm.epsilon
        if arm.trainable is not None:
            overrides["privacy.trainable"] = arm.trainable
        if arm.trainable == "all":  # per-sample gradients of every weight: 1.4x faster
            overrides["privacy.grad-sample-mode"] = "functorch"
        if arm.start == "scratch":  # the rate that trains this UNet from random weights
            overrides["training.finetune-learning-rate"] = config.training.pretrain_learning_rate
        if arm.learning_rate is not None:
            overrides["training.finetune-learning-rate"] = arm.learning_rate
        rate = overrides.get("training.finetune-learning-rate")
        if rate is not None and config.federation.server_optimizer == "adam":
            factor = rate / config.training.finetune_learning_rate
            overrides["federation.server-learning-rate"] = (
                factor * config.federation.server_learning_rate
            )
        if arm.pooled and config.privacy.batch_size is not None:
            overrides["privacy.batch-size"] = config.privacy.batch_size * len(arm.sites)
        overrides |= dict(arm.overrides)
        if not overrides:
            return config
        return config_from_dict(apply_overrides(to_dict(config), overrides))

    def training_sites(self, arm: Arm) -> dict[str, SiteLatents]:
        """The arm's sites, cut to its subjects; pooled: concatenated with subject ids kept
        apart (a subject is one privacy unit wherever it came from)."""
        unknown = [s for s in arm.sites if s not in self.sites]
        if unknown:
            raise ValueError(f"unknown sites {unknown}; the simulation has {self.names}")
        size = arm.subjects or self.setup.subjects
        chosen = {name: subset(self.sites[name], size) for name in arm.sites}
        if not arm.pooled:
            return chosen
        parts, offset = [], 0
        for site in chosen.values():
            parts.append(SiteLatents(site.latents, site.attributes, site.subjects + offset))
            offset += int(site.subjects.max()) + 1
        return {
            "pooled": SiteLatents(
                *(
                    torch.cat([getattr(p, f) for p in parts])
                    for f in ("latents", "attributes", "subjects")
                )
            )
        }

    def start(self, arm: Arm, seed: int) -> Weights:
        if arm.start == "public":
            return self.public
        torch.manual_seed(seed)
        return ConditionedUNet(self.setup.config).state_dict()

    def facts(self, seed: int, config: Config | None = None) -> dict:
        """What every cached result of this context depends on besides its own settings."""
        return {
            "version": ARM_VERSION,
            "seed": seed,
            "config": fingerprint_dict(config or self.setup.config),
            "unet": self.checkpoint_sha,
            "phantoms": str(self.data.phantoms),
            "held_out": str(self.data.held_out),
            "draws": SITE_DOMAIN_DRAWS,
        }

    def model_facts(self, seed: int) -> dict:
        """`facts` with the config cut to what the ceiling and the sampling checks depend
        on (pretraining, sampling, the seed): a study that changes only privacy or
        federation keys reuses them."""
        config = self.setup.config
        facts = self.facts(seed)
        facts["config"] = {
            "pretraining": pretraining_hash(config),
            "sampling": dataclasses.asdict(config.sampling),
            "seed": config.seed,
        }
        return facts

    def key(self, arm: Arm, seed: int) -> str:
        facts = {
            **self.facts(seed, self.config_for(arm)),
            "arm": {  # a field added later is left out at its default: old keys stay
                k: v
                for k, v in dataclasses.asdict(arm).items()
                if k not in LATER_FIELDS or v != LATER_FIELDS[k]
            },
            "subjects": arm.subjects or self.setup.subjects,
        }
        return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:20]

    def ceiling_key(self, seed: int, public_only: bool = False) -> str:
        plan = plan_facts(self.setup.ceiling, self.setup.config)
        facts = {"ceiling": plan, "facts": self.model_facts(seed)}
        if public_only:  # a field added later: the sites' ceiling keeps its key
            facts["public_only"] = True
        return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:20]

    def fidelity(self, weights: Weights, key: str) -> dict:
        """`SiteDomain.fidelity_spread` of `weights` over FIDELITY_SEEDS sampling seeds,
        cached (arms/fidelity-*.json) by `key`, which names whose weights they are (an
        arm's or the ceiling's key, or "public"), with the context's facts and the
        evaluation feature nets' file: sampling every held-out volume three times is the
        study's costliest measurement."""
        seeds = self.site_domain.sampling_seeds()
        nets_path = feature_net_path(self.pretrained.folder)
        facts = {
            "weights": key,
            "facts": self.model_facts(-1),  # no training seed: `key` has the weights' own
            "feature_net": file_sha256(nets_path),
            "sampling_seeds": seeds,
        }
        digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:20]
        path = self.arms / f"fidelity-{digest}.json"
        if path.is_file():
            log.info("fidelity of %s: cached, %s", key, path)
            return json.loads(path.read_text())
        started = time.perf_counter()
        result = self.site_domain.fidelity_spread(
            weights, load_feature_nets(nets_path.parent), seeds
        )
        log.info("fidelity of %s: %.0f s", key, time.perf_counter() - started)
        self.arms.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(result) + "\n")
        return result

    def pooled_sites(self) -> SiteLatents:
        return self.training_sites(Arm(tuple(self.names), None, pooled=True))["pooled"]

    def public_latents(self) -> SiteLatents:
        """The public phantoms the checkpoint was pretrained on, encoded once."""
        folder = self.data.phantoms / "public"
        state = self.cache / "studies" / "sites" / self.data.phantoms.name / "public"
        return site_latents(self.pretrained, self.pretrained.folder, folder, state, False)

    def ceiling(self, seed: int, keep_weights: bool = False, public_only: bool = False) -> dict:
        """The non-private ceiling (simulations/ceiling.py, trained as `setup.ceiling`
        plans) of every site's subjects pooled, from the public checkpoint: its site-domain
        loss at each check, its best step and loss; with `keep_weights`, also `weights`
        (the best check's). Cached as arms are, and summarised next to the held-out
        subjects (SiteDomain.ceiling_summaries), where a `flwr run` of this simulation
        finds it for its end-of-study share. `public_only`: the same training on the public
        checkpoint's own public subjects instead, no site data: how much of the ceiling's
        gain more training alone gives."""
        plan = self.setup.ceiling
        label = f"{'public-only ' if public_only else ''}ceiling (seed {seed})"
        result = self._cached(
            f"ceiling-{self.ceiling_key(seed, public_only)}",
            label,
            lambda: finetune_ceiling(
                self.setup.config,
                self.public,
                self.public_latents() if public_only else self.pooled_sites(),
                self.site_domain.loss,
                seed,
                plan,
                label=f"{label}: ",
            ),
            keep_weights,
        )
        if not public_only:
            self.site_domain.ceiling_summaries(self.data.phantoms, plan).write(seed, result)
        return result

    def _cached(
        self,
        stem: str,
        label: str,
        compute: Callable[[], tuple[dict, Weights]],
        keep_weights: bool,
    ) -> dict:
        """`compute()`'s (result, weights), kept as arms/STEM.json and .pt: a second call
        reads them back; `weights` joins the result with `keep_weights`."""
        path, weights_path = self.arms / f"{stem}.json", self.arms / f"{stem}.pt"
        if path.is_file() and weights_path.is_file():
            result = json.loads(path.read_text())
            log.info("%s: cached, %s", label, path)
        else:
            result, weights = compute()
            self.arms.mkdir(parents=True, exist_ok=True)
            save_torch(weights_path, weights)  # first: the JSON marks the result complete
            atomic_write_text(path, json.dumps(result) + "\n")
        if keep_weights:
            result["weights"] = load_torch(weights_path)
        return result

    def run(self, arm: Arm, seed: int, keep_weights: bool = False) -> dict:
        """The arm's site-domain loss per round (`loss`, round 0 = the start), each site's
        noise multiplier and the DP-SGD seconds; with `keep_weights`, also `weights` (the
        final UNet state dict). Cached (JSON and weights): a second call reads the first
        one's result."""

        def train() -> tuple[dict, Weights]:
            run = federate(
                self.config_for(arm),
                self.start(arm, seed),
                self.pretrained.unet,
                self.training_sites(arm),
                private=arm.epsilon is not None,
                evaluate=self.site_domain.loss,
                seed=seed,
                label=f"{arm.label} (seed {seed}): ",
            )
            return {"loss": run.history, "noise": run.noise, "seconds": run.seconds}, run.weights

        label = f"{arm.label} (seed {seed})"
        result = self._cached(self.key(arm, seed), label, train, keep_weights)
        return {"arm": arm.label, "seed": seed, **result}


def mean_loss(entry: dict[str, float]) -> float:
    """The mean over sites of one round's site-domain losses."""
    return sum(entry.values()) / len(entry)


def summary(name: str, setup: StudySetup, started: float, **fields) -> dict:
    """A study's result: its name, site size, seeds, config, `fields`, wall seconds since
    `started` (time.perf_counter)."""
    return {
        "study": name,
        "subjects_per_site": setup.subjects,
        "public_subjects": setup.public_subjects,
        "seeds": list(setup.seeds),
        "config": to_dict(setup.config),
        **fields,
        "seconds": time.perf_counter() - started,
    }
