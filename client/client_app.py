"""The hospital side of a Flower round: DP-SGD on the global UNet, then the update back.

The server's train message carries the global UNet weights (ArrayRecord "arrays") and a
ConfigRecord "config" with the round number, the study's training config (JSON text, so
every site trains the same thing), the public checkpoint folder and, for a simulation,
the phantom and run folders. Where a site's data and state live and how much epsilon it
allows come from the node config (client/node_config.py), never from the server.

The reply carries the trained weights and, as metrics, only what anyone may recompute the
spend from: noise_multiplier, sample_rate, steps, subjects and refused. No loss and no
epsilon: the server recomputes epsilon itself from these numbers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsynth.client.budget import BudgetRefusal
from fedsynth.client.node_config import site_settings
from fedsynth.client.site_round import run_site_round
from fedsynth.common.config import config_from_dict
from fedsynth.common.models import resolve_device

app = ClientApp()


def _optional_path(config: ConfigRecord, key: str) -> Path | None:
    value = str(config.get(key, "") or "")
    return Path(value) if value else None


@app.train()
def train(message: Message, context: Context) -> Message:
    """One round at this site; a spent budget becomes a `refused` reply, not a crash."""
    return Message(site_round_reply(message.content, context.node_config), reply_to=message)


def site_round_reply(received: RecordDict, node_config: Mapping[str, object]) -> RecordDict:
    """The reply's content for the server's train instruction (Flower-free to test)."""
    sent = received["config"]
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
    weights = received["arrays"].to_torch_state_dict()
    try:
        update = run_site_round(
            settings, config, checkpoint, weights, round_number, resolve_device(config.device)
        )
    except BudgetRefusal as refusal:
        content = RecordDict(
            {
                "metrics": MetricRecord(
                    {
                        "noise_multiplier": 0.0,
                        "sample_rate": 0.0,
                        "steps": 0,
                        "subjects": 0,
                        "refused": 1,
                    }
                ),
                "site": ConfigRecord({"site": settings.name, "reason": str(refusal)}),
            }
        )
        return content
    plan = update.plan
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: v.contiguous() for k, v in update.weights.items()}),
            "metrics": MetricRecord(
                {
                    "noise_multiplier": float(plan.noise_multiplier),
                    "sample_rate": float(plan.sample_rate),
                    "steps": int(plan.steps),
                    "subjects": int(plan.subjects),
                    "refused": 0,
                }
            ),
            "site": ConfigRecord({"site": settings.name, "reason": ""}),
        }
    )
    return content


def _threads() -> None:
    """One torch thread per simulated site unless OMP_NUM_THREADS says otherwise."""
    import os

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


_threads()
