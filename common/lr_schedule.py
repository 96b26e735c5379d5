"""The learning-rate schedule of public pretraining, composed from torch's schedulers."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    SequentialLR,
)

from fedsynth.common.config import TrainingConfig

COSINE_FLOOR = 0.02  # the cosine ends at this fraction of the peak rate, not at zero


def pretraining_schedule(
    optimizer: torch.optim.Optimizer, training: TrainingConfig
) -> LRScheduler | None:
    """Per-step rate of the UNet's pretraining, `pretrain-learning-rate` at its peak: with
    w = `pretrain-warmup-steps` > 0, step k (from 0) of the first w runs at
    (1/w + (1 - 1/w) k / w) of the peak, so step w + 1 is the first at the peak (torch's
    LinearLR); then the peak is held (`constant`) or annealed along a half cosine to
    COSINE_FLOOR of it at `pretrain-steps` (`cosine`; Loshchilov & Hutter 2017, SGDR,
    without restarts). The config keeps w below `pretrain-steps`. Call `step()` after each
    optimiser step. None for a constant rate without warmup: nothing to schedule."""
    steps, warmup = training.pretrain_steps, training.pretrain_warmup_steps
    if training.pretrain_schedule == "constant" and warmup == 0:
        return None
    after: LRScheduler
    if training.pretrain_schedule == "cosine":
        peak = optimizer.param_groups[0]["lr"]
        after = CosineAnnealingLR(
            optimizer, T_max=max(1, steps - warmup), eta_min=COSINE_FLOOR * peak
        )
    else:
        after = ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup == 0:
        return after
    ramp = LinearLR(optimizer, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup)
    return SequentialLR(optimizer, [ramp, after], milestones=[warmup])
