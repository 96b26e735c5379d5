"""The round's update: the subject-weighted mean of the sites' deltas (FedAvg).

One function for the federated study (`flwr run`, deltas as Flower Parameters) and the
in-process studies (simulations/federated.py, deltas as tensors). Under SecAgg+ the
workflow has already unmasked the weighted mean, which every result then carries.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from flwr.common import Parameters, parameters_to_ndarrays

Delta = Mapping[str, torch.Tensor]


def subject_weighted_mean(
    subjects: Sequence[int], deltas: Iterable[Delta]
) -> dict[str, torch.Tensor]:
    """sum_k n_k / N * delta_k per tensor, in float64 (McMahan et al. 2017, FedAvg, with
    subjects as the weight); sites of weight 0 are left out; {} when none is left.

    `subjects`: n_k per site; `deltas`: tensor name -> delta per site, in the same order,
    every site with the same names, taken one at a time (an iterator converts each site's
    delta only when it is added)."""
    total = sum(n for n in subjects if n > 0)
    mean: dict[str, torch.Tensor] = {}
    for n, delta in zip(subjects, deltas, strict=True):
        if n <= 0:
            continue
        for key, value in delta.items():
            scaled = value.double() * (n / total)
            mean[key] = scaled if key not in mean else mean[key] + scaled
    return mean


def as_tensors(keys: Sequence[str], parameters: Parameters) -> dict[str, torch.Tensor]:
    """Flower Parameters (arrays in `keys` order) as tensor name -> float64 tensor."""
    arrays = parameters_to_ndarrays(parameters)
    return {
        key: torch.from_numpy(np.asarray(value, np.float64))
        for key, value in zip(keys, arrays, strict=True)
    }
