"""The server's step: how the sites' mean delta moves the global weights.

FedOpt (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2): the sites'
subject-weighted mean delta is a pseudo-gradient for a server optimiser. `sgd` adds
`federation.server-learning-rate` times the mean delta (1 is FedAvg). `adam` is
torch.optim.Adam on minus the mean delta (FedAdam): each weight moves by about the rate
in the direction the sites agree on, its moments kept across rounds (saved with each
round's checkpoint, so a resumed study continues them). Both act on the aggregate only:
post-processing of the sites' DP-SGD output, no privacy cost.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedsynth.common.checkpoint import load_torch, save_torch
from fedsynth.common.config import FederationConfig

STATE_FILE = "server_optimizer.pt"  # in a round's checkpoint folder (adam only)
ADAM_BETAS = (0.9, 0.99)  # Reddi et al. 2021, section 5 (FedAdam)
ADAM_EPS = 1e-8  # small against a delta (~1e-3 to 1e-2 a weight): a first step of ~rate


def server_step(old: torch.Tensor, delta: torch.Tensor, rate: float) -> torch.Tensor:
    """`old` + `rate` x `delta` (the sites' mean delta, any shape of old's size), summed in
    float64 and returned in old's dtype; integer buffers (counters) are returned unchanged.
    The `sgd` server optimiser (rate 1: FedAvg)."""
    if not old.is_floating_point():
        return old
    change = delta.double().reshape(old.shape) * rate
    return (old.double() + change).to(old.dtype)


class ServerOptimizer:
    """Applies each round's mean delta to `weights` (a state dict, changed in place)."""

    def __init__(self, config: FederationConfig, weights: dict[str, torch.Tensor]) -> None:
        self.rate = config.server_learning_rate
        self.adam: torch.optim.Adam | None = None
        self.masters: dict[str, torch.nn.Parameter] = {}
        if config.server_optimizer == "adam":  # float64 copies: Adam's steps add up exactly
            self.masters = {
                k: torch.nn.Parameter(v.detach().double().clone())
                for k, v in weights.items()
                if v.is_floating_point()
            }
            self.adam = torch.optim.Adam(
                list(self.masters.values()), lr=self.rate, betas=ADAM_BETAS, eps=ADAM_EPS
            )

    def step(self, weights: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> None:
        """Move `weights[k]` by the mean delta `delta[k]` (keys: the tensors that travel)."""
        if self.adam is None:
            for key, change in delta.items():
                weights[key] = server_step(weights[key], change, self.rate)
            return
        for key, master in self.masters.items():  # no delta: no grad, Adam skips it
            moved = delta.get(key)
            master.grad = None if moved is None else -moved.double().reshape(master.shape)
        self.adam.step()
        for key, master in self.masters.items():
            if key in delta:
                weights[key] = master.detach().to(weights[key].dtype).clone()

    def save(self, folder: Path) -> None:
        """The moments and the float64 weights next to a round's checkpoint (adam only)."""
        if self.adam is not None:
            masters = {k: v.detach() for k, v in self.masters.items()}
            save_torch(folder / STATE_FILE, {"adam": self.adam.state_dict(), "masters": masters})

    def load(self, folder: Path) -> bool:
        """Continue the moments `save` wrote in `folder`, at this config's rate (a resume
        may lower it); False when there is nothing that fits (sgd, a round saved without
        them, or other tensors travelling now): Adam then starts with fresh moments."""
        path = folder / STATE_FILE
        if self.adam is None or not path.is_file():
            return False
        saved = load_torch(path)
        if list(saved["masters"]) != list(self.masters):
            return False
        with torch.no_grad():
            for key, master in self.masters.items():
                master.copy_(saved["masters"][key])
        self.adam.load_state_dict(saved["adam"])
        for group in self.adam.param_groups:  # torch restores the saved rate: use ours
            group.update(lr=self.rate, betas=ADAM_BETAS, eps=ADAM_EPS)
        return True
