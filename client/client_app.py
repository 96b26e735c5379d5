"""The hospital side of a Flower round: DP-SGD on the global UNet, then the update back.

A legacy Flower client (NumPyClient via client_fn) so that Flower SecAgg+ (secaggplus_mod,
used when the server runs SecAggPlusWorkflow) can mask the reply. The server's fit
instruction carries the global UNet tensors (in the order of the config's `keys`) and a
config with the round number, the study's training config (JSON text, so
every site trains the same thing), the public checkpoint folder and, for a simulation,
the phantom and run folders. Where a site's data and state live and how much epsilon it
allows come from the node config (client/node_config.py), never from the server.

The reply carries the weight DELTA (trained - global), num_examples = subjects (the
FedAvg weight) and, as metrics, the site's name, a refusal's reason and only what anyone
may recompute the spend from: noise_multiplier, sample_rate, steps, subjects, refused,
`history` (the site's own ledger of trained rounds, so the server can charge a round whose
update it never received: a lost reply, a server killed before its ledger line) and
`epsilon`, the site's own total so far, which the server only compares with its own
recomputation (a mismatch means the two ledgers diverged) and never uses. No loss. Under
SecAgg+ the delta leaves the site only masked (and widened to float64 first, see
_widened); a refused site answers a zero delta with weight 0 so the protocol keeps its
share holders and the sum is unchanged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, Context, Message
from flwr.app.message_type import MessageType
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fedsynth.client.budget import BudgetRefusal, SiteBudget
from fedsynth.client.node_config import SiteSettings, site_settings
from fedsynth.common.config import Config, config_from_dict
from fedsynth.common.errors import FedsynthError

if TYPE_CHECKING:
    import torch


def _optional_path(sent: Mapping[str, object], key: str) -> Path | None:
    value = str(sent.get(key, "") or "")
    return Path(value) if value else None


def site_round_reply(
    weights: dict[str, torch.Tensor], sent: Mapping[str, object], node_config: Mapping[str, object]
) -> tuple[dict[str, np.ndarray], int, dict[str, bool | bytes | float | int | str]]:
    """(delta per key, subjects, metrics) for the server's instruction (Flower-free to test).

    The delta is trained - global for every key of `weights`; a refusal (spent budget) is
    an all-zero delta with weight 0, so it adds nothing to a (secure) weighted mean.
    With `clipping-range` > 0 (SecAgg+), a delta or a weight outside what SecAgg+ can
    carry unclipped is an error, never silently clipped.
    """
    # torch, MONAI and Opacus load only here: Flower starts a ClientApp process per
    # message, and the SecAgg+ stages other than training need none of them
    from fedsynth.client.site_round import run_site_round
    from fedsynth.common.models import resolve_device

    round_number = int(sent["round"])
    config = config_from_dict(json.loads(str(sent["study"])))
    settings = site_settings(
        node_config,
        config.privacy.target_epsilon,
        simulation_data=_optional_path(sent, "phantoms"),
        simulation_state=_optional_path(sent, "site-states"),
    )
    # a hospital names its own copy of the public checkpoint; a simulation uses the server's
    checkpoint = str(node_config.get("checkpoint", "") or sent["checkpoint"])
    try:
        update = run_site_round(
            settings,
            config,
            checkpoint,
            weights,
            round_number,
            resolve_device(config.device),
            max_subjects=float(sent.get("max-weight", 0.0) or 0.0),
        )
    except BudgetRefusal as refusal:
        zeros = {k: np.zeros_like(v.numpy()) for k, v in weights.items()}
        metrics = {"noise_multiplier": 0.0, "sample_rate": 0.0, "steps": 0, "subjects": 0,
                   "refused": 1, "site": settings.name, "reason": str(refusal),
                   "history": _history(settings), "epsilon": _spent(settings, config)}  # fmt: skip
        return zeros, 0, metrics
    plan = update.plan
    delta = {
        k: (update.weights[k].detach().cpu() - v).numpy() if v.is_floating_point()
        else np.zeros_like(v.numpy())
        for k, v in weights.items()
    }  # fmt: skip
    _check_fits_clipping_range(delta, sent, settings.name)
    metrics = {
        "noise_multiplier": float(plan.noise_multiplier),
        "sample_rate": float(plan.sample_rate),
        "steps": int(plan.steps),
        "subjects": int(plan.subjects),
        "refused": 0,
        "site": settings.name,
        "reason": "",
        "history": _history(settings),
        "epsilon": float(plan.epsilon),
    }
    return delta, int(plan.subjects), metrics


def _budget(settings: SiteSettings) -> SiteBudget:
    return SiteBudget(settings.name, settings.state_dir, settings.max_epsilon)


def _history(settings: SiteSettings) -> str:
    """The site's own ledger of trained rounds (JSON): spend the server may have missed."""
    return json.dumps(_budget(settings).history())


def _spent(settings: SiteSettings, config: Config) -> float:
    return float(_budget(settings).spent_epsilon(config.privacy))


def _check_fits_clipping_range(
    delta: dict[str, np.ndarray], sent: Mapping[str, object], site: str
) -> None:
    """Under SecAgg+ a delta beyond the clipping range would be clipped: fail instead."""
    clip = float(sent.get("clipping-range", 0.0) or 0.0)
    if clip <= 0:
        return
    largest = max((float(np.abs(d).max()) for d in delta.values() if d.size), default=0.0)
    if largest > clip:
        raise FedsynthError(
            f"{site}: largest |weight delta| {largest:.4g} exceeds the secure aggregation "
            f"clipping range {clip:g}; it would be clipped: raise the server's run config "
            "secagg-clipping-range"
        )


class SiteClient(NumPyClient):
    """The legacy client SecAgg+ needs: parameters in `keys` order in, deltas out."""

    def __init__(self, node_config: Mapping[str, object]) -> None:
        self.node_config = node_config

    def fit(self, parameters, config):  # type: ignore[override]
        import torch

        if "OMP_NUM_THREADS" not in os.environ:  # simulated sites share the machine's cores
            torch.set_num_threads(1)
        keys = json.loads(str(config["keys"]))
        weights = {k: torch.from_numpy(np.array(a)) for k, a in zip(keys, parameters, strict=True)}
        delta, subjects, metrics = site_round_reply(weights, config, self.node_config)
        return [delta[k] for k in keys], subjects, metrics


def secure_aggregation_when_asked(msg: Message, ctxt: Context, call_next: ClientAppCallable):
    """SecAgg+ for the server's SecAgg+ messages; plain train messages pass through."""
    if (
        msg.metadata.message_type == MessageType.TRAIN
        and RECORD_KEY_CONFIGS in msg.content.config_records
    ):
        return secaggplus_mod(msg, ctxt, lambda m, c: _widened(call_next(m, c)))
    return call_next(msg, ctxt)


def _widened(reply: Message) -> Message:
    """The reply's arrays as float64 before SecAgg+ quantises them: the mod computes
    (x + clipping_range) in the arrays' own dtype, and in float32 that alone costs
    ~5e-7 at a range of 4 (float64: ~1e-15), more than the quantisation step (~7e-9).
    This runs at the site, inside the mod: only masked integers leave it."""
    if reply.has_content():
        for record in reply.content.array_records.values():
            for key in list(record.keys()):
                # at least 1-d: Flower's quantize turns a 0-d array into a numpy scalar
                # and the sum comes back wrong (0.0 came back 8.0 in tests); the server
                # reshapes to the global tensor's shape
                record[key] = Array(np.atleast_1d(record[key].numpy().astype(np.float64)))
    return reply


def client_fn(context: Context):
    return SiteClient(context.node_config).to_client()


app = ClientApp(client_fn=client_fn, mods=[secure_aggregation_when_asked])
