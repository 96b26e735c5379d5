"""Gradient canaries for the one-run privacy audit (simulations/dp_audit.py).

A canary is a subject whose gradient, whenever Poisson sampling picks it, is `clip` times
+-1 at one coordinate of the trained weights and 0 elsewhere (a "Dirac canary": Nasr et
al. 2021, "Adversary instantiation: lower bounds for differentially private machine
learning", IEEE S&P; Steinke, Nasr & Jagielski 2023, section 6): the worst case DP-SGD
must hide, a subject with the largest gradient it allows in a direction no other canary
shares. Each canary has its own coordinate, so the final model's weight there, against
the public checkpoint's, shows whether it was trained on; the DP-SGD step (sampling,
clipping, noise, the optimiser) is the site's own.

Canaries whose volumes were random latents, scored by their diffusion loss as the loss
attack of `fedsynth audit` scores subjects, were tried first: even without noise and
after 40 full-batch steps on every UNet weight, their losses did not tell members from
non-members (AUC 0.52-0.56; docs/results.md), so a loss audit cannot show that noise is
missing, which is what an audit of the implementation must show.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

CLIP_SHARE = 1.0  # a canary's gradient norm, as a share of the clip: the largest allowed


@dataclass(frozen=True)
class AuditPlan:
    """How `fedsynth study dp-audit` audits: `canaries` subjects at the first site, each in
    training with probability 1/2; the auditor guesses on the `guess_share` of them with
    the most extreme scores (half of those guessed in, half out) and abstains on the rest.
    With `no_noise` the sites train with noise multiplier 0: a calibration that shows the
    audit can catch a broken DP-SGD, never a way to train."""

    canaries: int = 256
    guess_share: float = 0.5
    confidence: float = 0.95
    no_noise: bool = False

    def __post_init__(self) -> None:
        if self.canaries < 2:
            raise ValueError(f"canaries must be at least 2, got {self.canaries}")
        if not 0 < self.guess_share <= 1:
            raise ValueError(f"guess_share must be in (0, 1], got {self.guess_share}")

    @property
    def guesses(self) -> int:
        """How many canaries the auditor guesses on: an even number from 2 to m."""
        share = 2 * round(self.canaries * self.guess_share / 2)
        return min(max(2, share), self.canaries - self.canaries % 2)


@dataclass(frozen=True)
class GradientCanaries:
    """m canaries: `names[c]` and `flat[c]` (m,) the weight (state-dict key, index into
    it flattened) canary c pushes, `signs` (m,) +-1 its direction, `included` (m,) bool
    whether the site trains on it; `clip` the per-subject clip (the gradient's norm)."""

    names: tuple[str, ...]
    flat: torch.Tensor
    signs: torch.Tensor
    included: torch.Tensor
    clip: float

    @property
    def count(self) -> int:
        return len(self.included)

    @property
    def members(self) -> torch.Tensor:
        """The included canaries' indices (k,): the site's subjects n..n+k-1, in order."""
        return self.included.nonzero().flatten()

    @property
    def size(self) -> int:
        """Subjects the canaries add to the site (client/dp_trainer.GivenGradients)."""
        return len(self.members)

    def gradients(
        self, sampled: torch.Tensor, params: dict[str, nn.Parameter]
    ) -> dict[str, torch.Tensor]:
        """Per trained weight (name: param), the sampled canaries' per-subject gradients
        (k, *shape): `sampled` (k,) indexes `members`. Each row has norm `clip`."""
        picked = self.members[sampled]
        rows = {name: p.new_zeros((len(picked), p.numel())) for name, p in params.items()}
        for row, c in enumerate(picked.tolist()):
            rows[self.names[c]][row, int(self.flat[c])] = float(self.signs[c]) * self.clip
        return {name: r.view(len(picked), *params[name].shape) for name, r in rows.items()}


def make_canaries(
    shapes: dict[str, torch.Size], m: int, clip: float, seed: int
) -> GradientCanaries:
    """m canaries on distinct coordinates drawn uniformly over the weights `shapes` (name:
    shape, the trained subset), random signs, each included with probability 1/2; all from
    `seed`. Raises ValueError if there are fewer coordinates than canaries."""
    names = list(shapes)
    sizes = torch.tensor([shapes[n].numel() for n in names])
    total = int(sizes.sum())
    if not 1 <= m <= total:
        raise ValueError(f"need 1 to {total} canaries (one per trained weight), got {m}")
    generator = torch.Generator().manual_seed(seed)
    coordinates = torch.randperm(total, generator=generator)[:m]
    ends = torch.cumsum(sizes, 0)
    which = torch.searchsorted(ends, coordinates, right=True)
    flat = coordinates - (ends - sizes)[which]
    signs = torch.randint(0, 2, (m,), generator=generator).double() * 2 - 1
    included = torch.rand(m, generator=generator) < 0.5
    return GradientCanaries(
        tuple(names[int(k)] for k in which), flat, signs, included, clip * CLIP_SHARE
    )


def canary_scores(canaries: GradientCanaries, start: dict, final: dict) -> torch.Tensor:
    """How far each canary's weight moved the way its gradient pushes it (m,): sign times
    (start - final), as gradient descent lowers a weight whose gradient is positive."""
    moved = torch.stack(
        [
            (start[name].flatten()[int(k)] - final[name].flatten()[int(k)]).double()
            for name, k in zip(canaries.names, canaries.flat, strict=True)
        ]
    )
    return canaries.signs * moved
