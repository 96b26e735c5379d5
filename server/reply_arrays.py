"""What the server accepts of the arrays a round brings back, checked before anything is written.

Plain FedAvg: each reply carries one site's delta of the travelling tensors, in `keys`
order: exactly one array per key, each with the global tensor's shape and dtype (a site
sends trained - global in the global's dtype, client/client_app.py) and all finite. A
reply that fails counts as no valid reply (server/round_charges.py: the site is charged
the most it could have spent), so a NaN never reaches the global model.

SecAgg+: every result carries the same unmasked subject-weighted mean; the server never
sees one site's delta, so it checks the mean against what honest sites can produce. An
honest site's delta is finite and within [-clip, clip] (checked at the site,
client/client_app.py `_unsendable`) and its weight subjects / max_weight is at most 1
(client/site_round.py), so the weighted mean is within [-clip, clip] too, up to Flower's
stochastic rounding: one quantisation step (2 clip / quantization_range) per site over
the summed weights. A NaN from a faulty site does not arrive as a NaN: Flower's
`quantize` (flwr/common/secure_aggregation/quantization.py) casts ceil(NaN) to int32,
which gives -2**31, i.e. 2**31 modulo the 2**32 modulus; with quantization_range below
2**31 / sites (server/secure_aggregation.py) every sum of honest values is below 2**31,
so that weight's mean comes out above clip (at least clip (sites + 2) / sites) and the
round is discarded. (NaNs from two sites add up to 2**32, i.e. 0: two sites at -clip,
within the range, which the server cannot tell from honest updates.)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
from flwr.common import FitRes, Parameters, bytes_to_ndarray

from fedsynth.server.site_replies import BadReply


def _arrays(parameters: Parameters, keys: Sequence[str], what: str) -> Iterator[np.ndarray]:
    """The arrays of `parameters`, one at a time (a site's delta may be large); raises
    BadReply when there is not one per key or one is not a numpy array."""
    if len(parameters.tensors) != len(keys):
        raise BadReply(f"{what}: {len(parameters.tensors)} arrays for {len(keys)} tensors")
    for key, data in zip(keys, parameters.tensors, strict=True):
        try:
            yield bytes_to_ndarray(data)
        except Exception:  # numpy's loader raises several types on a damaged array
            raise BadReply(f"{what}: {key} is not a numpy array") from None


def check_reply_arrays(parameters: Parameters, weights: Mapping[str, torch.Tensor]) -> None:
    """Raise BadReply unless a plain reply holds one finite array per tensor of `weights`
    (the travelling global tensors, in order), each of the global tensor's shape and dtype.
    The text names the check and the tensor, never a value."""
    keys = list(weights)
    for key, array in zip(keys, _arrays(parameters, keys, "arrays"), strict=True):
        glob = weights[key]
        if array.dtype != glob.numpy().dtype:
            raise BadReply(f"arrays: {key} has another dtype than the global tensor")
        if array.shape != tuple(glob.shape):
            raise BadReply(f"arrays: {key} has another shape than the global tensor")
        if not np.isfinite(array).all():
            raise BadReply(f"arrays: {key} holds non-finite values")


def aggregate_problem(
    results: Sequence[FitRes],
    weights: Mapping[str, torch.Tensor],
    clipping_range: float,
    quantization_range: int,
    max_weight: float,
) -> str:
    """Why the unmasked SecAgg+ mean every result carries is not one honest sites can
    produce ('' when it is): not one array per tensor of `weights` with its number of
    values, not finite, a site's weight not in (0, 1] (subjects not between 1 and
    `max_weight`), or a value beyond `clipping_range` by more than the sites' stochastic
    rounding (see module)."""
    if not results:
        return ""
    if any(not 1 <= res.num_examples <= max_weight for res in results):
        return "a site's subjects are not between 1 and secagg-max-weight"
    total = sum(res.num_examples for res in results) / max_weight
    step = 2 * clipping_range / quantization_range
    bound = clipping_range + 2 * len(results) * step / total
    keys = list(weights)
    what = "the unmasked aggregate"
    try:
        for key, array in zip(keys, _arrays(results[0].parameters, keys, what), strict=True):
            if array.size != weights[key].numel():
                return f"{what}: {key} has another number of values than the global tensor"
            if array.dtype.kind != "f" or not np.isfinite(array).all():
                return f"{what}: {key} is not finite floating point"
            if array.size and float(np.abs(array).max()) > bound:
                return f"{what}: {key} is beyond the clipping range {clipping_range:g}"
    except BadReply as error:
        return str(error)
    return ""
