"""The non-private ceiling of a study: what the sites' data offers a model without privacy.

A DP study is judged by the part of this ceiling's gain it captures, not against the same
few steps without noise (a bar that rewards doing little). The ceiling is the public
checkpoint finetuned on the pooled training subjects of every site, every UNet weight,
without clipping or noise, as it was pretrained (server/pretrain.py: AdamW, batches of
`training.pretrain-batch-size` volumes drawn with replacement, the moving average of the
weights at `training.pretrain-ema-decay`) at the constant rate `CeilingPlan.learning_rate`
(5e-4 unless a study sets another: the default's constant pretraining rate), whatever
schedule the checkpoint was pretrained with. The
site-domain loss on the held-out subjects is measured every `CeilingPlan.check_every` steps
until the sites' mean has not improved for `patience` checks or `max_steps` ran; the best
check is the ceiling. Choosing the step on the held-out subjects can only raise the bar.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from fedsynth.client.latents import SiteLatents
from fedsynth.common.config import Config
from fedsynth.common.diffusion import per_sample_loss, training_scheduler
from fedsynth.common.models import ConditionedUNet

log = logging.getLogger(__name__)

Weights = dict[str, torch.Tensor]


@dataclass(frozen=True)
class CeilingPlan:
    """How the ceiling trains: AdamW at `learning_rate` for at most `max_steps`, checked
    every `check_every` steps, stopped after `patience` checks without a lower mean
    site-domain loss."""

    max_steps: int = 3000
    check_every: int = 100
    patience: int = 4
    learning_rate: float = 5e-4


def plan_facts(plan: CeilingPlan, config: Config) -> dict:
    """What a ceiling's cache keys hash of its plan: `learning_rate` only where it differs
    from `training.pretrain-learning-rate`, the rate every ceiling trained at before the
    field existed, so their keys stay valid."""
    facts = dataclasses.asdict(plan)
    if facts["learning_rate"] == config.training.pretrain_learning_rate:
        del facts["learning_rate"]
    return facts


def mean_of(losses: dict[str, float]) -> float:
    return sum(losses.values()) / len(losses)


def finetune_ceiling(
    config: Config,
    start: Weights,
    pooled: SiteLatents,
    evaluate: Callable[[Weights], dict[str, float]],
    seed: int,
    plan: CeilingPlan = CeilingPlan(),
    label: str = "",
) -> tuple[dict, Weights]:
    """Train every weight of a ConditionedUNet from `start` on `pooled` (latents (N, C, H,
    W, D), attributes (N, A)) without privacy; `evaluate(weights)` gives the site-domain
    loss per site. Returns ({"checks": [{"step", "loss"}], "best_step", "best", "seconds",
    "plan"}, the best check's weights (the moving average)). Batches and diffusion draws
    come from generators seeded by `seed`."""
    train = config.training
    unet = ConditionedUNet(config)
    unet.load_state_dict(start)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=plan.learning_rate)
    decay = train.pretrain_ema_decay
    ema = AveragedModel(unet, multi_avg_fn=get_ema_multi_avg_fn(decay)) if decay > 0 else None
    scheduler = training_scheduler(config.diffusion)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + 17)

    def averaged() -> Weights:
        source = ema.module if ema is not None else unet
        return {k: v.detach().clone() for k, v in source.state_dict().items()}

    checks = [{"step": 0, "loss": evaluate(start)}]
    best, best_weights, started = checks[0], dict(start), time.perf_counter()
    unet.train()
    for step in range(1, plan.max_steps + 1):
        size = (train.pretrain_batch_size,)
        index = torch.randint(len(pooled.latents), size, generator=generator)
        loss = per_sample_loss(
            unet,
            scheduler,
            pooled.latents[index],
            pooled.attributes[index],
            config.diffusion.condition_dropout,
            generator,
        ).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update_parameters(unet)
        if step % plan.check_every:
            continue
        weights = averaged()
        checks.append({"step": step, "loss": evaluate(weights)})
        mean = mean_of(checks[-1]["loss"])
        if mean < mean_of(best["loss"]):
            best, best_weights = checks[-1], weights
        log.info(
            "%sstep %d: mean site-domain loss %.4f (best %.4f at step %d), %.0f s",
            label,
            step,
            mean,
            mean_of(best["loss"]),
            best["step"],
            time.perf_counter() - started,
        )
        if (step - best["step"]) // plan.check_every >= plan.patience:
            break
    result = {
        "checks": checks,
        "best_step": best["step"],
        "best": best["loss"],
        "seconds": time.perf_counter() - started,
        "plan": dataclasses.asdict(plan),
    }
    return result, best_weights
