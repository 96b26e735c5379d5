"""A site's optimiser state between rounds: kept in its own state dir, per study, never sent.

FedAvg sends weights, not optimiser state, so a site's AdamW would start each round with
no moments: its first step moves every trained weight by about the full rate in the
direction of that step's noisy gradient, noise included. Keeping the moments from round to
round lets them average the DP noise over the study instead (docs/results.md, section 1).
They are computed from the noisy, clipped gradients only (post-processing of DP-SGD), yet
they stay with the site's other private files: 0600 in the 0700 state dir.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch

from fedsynth.common.checkpoint import load_torch
from fedsynth.common.errors import FedsynthError
from fedsynth.common.io import PRIVATE_MODE, atomic_path, private_dir

log = logging.getLogger(__name__)

FOLDER = "optimizer"  # in the site's state dir


def state_path(state_dir: Path, study_id: str) -> Path:
    """Where a study's kept state lives: one file per study (two studies at one site keep
    their own), named by a hash of the study id."""
    digest = hashlib.sha256(study_id.encode()).hexdigest()[:16]
    return Path(state_dir) / FOLDER / f"{digest}.pt"


def load_kept(state_dir: Path, study_id: str) -> dict[str, Any] | None:
    """The state the site's previous round of this study kept, or None (first round, or a
    file that cannot be read: logged, and the round starts the optimiser fresh)."""
    path = state_path(state_dir, study_id)
    if not path.is_file():
        return None
    try:
        state = load_torch(path)
    except FedsynthError as error:
        log.warning("%s; this round starts its optimiser fresh", error)
        return None
    return state if isinstance(state, dict) else None


def keep(state_dir: Path, study_id: str, state: dict[str, Any]) -> None:
    """Write `state` (RoundResult.optimizer_state) atomically, owner-only."""
    path = state_path(state_dir, study_id)
    private_dir(path.parent)
    with atomic_path(path, mode=PRIVATE_MODE) as tmp:
        torch.save(state, tmp)
