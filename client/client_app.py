"""The hospital side of a Flower round: READY, then DP-SGD on the global UNet, delta back.

A legacy Flower client (NumPyClient via client_fn) so that Flower SecAgg+ (secaggplus_mod,
used when the server runs SecAggPlusWorkflow) can mask the reply. Mods, outermost first:
- `site_guard`: no exception text leaves the site except a SiteStop's fixed
  `fedsynth:<code>: ...` (Flower sends a ClientApp exception's text to the server); the
  details go to the site's own log (client/site_log.py).
- `answer_ready`: the READY query (common/protocol.py), answered from the node config and
  the site's own ledger, without reading data or loading torch.
- `secure_aggregation_when_asked`: SecAgg+ for SecAgg+ messages; plain ones pass through.

The server's fit instruction carries the global UNet's trainable subset (the tensors
named in the config's `keys`, in that order; the rest is the public checkpoint, which the
site checks against the config's `checkpoint-sha256` before it reads data or spends) and a
config with the round number, the study's training config (JSON, so every site trains
the same thing), the public checkpoint folder and, for a simulation, the phantom and run
folders. Where a site's data and state live, and its privacy terms,
come from the node config (client/node_config.py), never from the server.

The reply carries the weight DELTA (trained - global) of the sent tensors, num_examples =
subjects (the FedAvg weight) and exactly the metrics in protocol.REPLY_METRICS. A site that will not
train raises SiteStop, so it sends nothing: under SecAgg+ it never adds a zero update to
a masked sum. A site that fails after it recorded its spend writes `failed.json` in its
state dir and answers READY with `failed-before` until an operator removes the file.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
from flwr.app import Array, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client import Client, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Stage
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey

from fedsynth.client.budget import BudgetRefusal, SiteBudget
from fedsynth.client.node_config import NodeConfig, SiteSettings, site_settings
from fedsynth.client.site_log import at_site
from fedsynth.client.site_terms import (
    check_delta_for_subjects,
    check_terms,
    refuse,
)
from fedsynth.common.config import Config, config_from_dict
from fedsynth.common.errors import FedsynthError
from fedsynth.common.io import atomic_write_text
from fedsynth.common.logs import show_on_console
from fedsynth.common.protocol import READY_RECORD, SiteStop

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

FAILED = "failed.json"
_MASKED = contextvars.ContextVar("fedsynth_masked", default=False)


def _optional_path(sent: Mapping[str, object], key: str) -> Path | None:
    value = str(sent.get(key, "") or "")
    return Path(value) if value else None


def _study(sent: Mapping[str, Any]) -> tuple[Config, int]:  # the server's values, unchecked
    try:
        return config_from_dict(json.loads(str(sent["study"]))), int(sent["round"])
    except (KeyError, ValueError, TypeError, FedsynthError) as error:
        raise refuse(None, "config", f"the server's study config is unusable: {error}") from None


def _settings(sent: Mapping[str, object], node_config: NodeConfig, config: Config) -> SiteSettings:
    try:
        return site_settings(
            node_config,
            config.privacy.target_epsilon,
            simulation_data=_optional_path(sent, "phantoms"),
            simulation_state=_optional_path(sent, "site-states"),
            secure_aggregation=config.federation.secure_aggregation,
        )
    except FedsynthError as error:
        raise refuse(None, "config", str(error)) from None


def _budget(settings: SiteSettings) -> SiteBudget:
    return SiteBudget(settings.name, settings.state_dir, settings.max_epsilon)


def ready_answer(
    sent: Mapping[str, object], node_config: NodeConfig
) -> dict[str, int | float | str]:
    """The READY reply (protocol.READY_METRICS) from node config and ledger; no data read."""
    config, round_number = _study(sent)
    settings = _settings(sent, node_config, config)
    budget = _budget(settings)
    study_id = str(sent.get("study-id", ""))
    code = "ready"
    try:
        if (settings.state_dir / FAILED).is_file():
            code = "failed-before"
        else:
            budget.refuse_if_exhausted(config.privacy)
            check_terms(settings, config, config.federation.secure_aggregation)
    except BudgetRefusal:
        code = "budget-spent"
    except SiteStop as stop:
        code = stop.code
    if code != "ready":
        log.warning(
            "round %d: not ready (%s)", round_number, code, extra=at_site(settings.state_dir)
        )
    return {
        "site": settings.name,
        "ready": int(code == "ready"),
        "code": code,
        "history": json.dumps(budget.history(study_id)),
        "signed": json.dumps(budget.signed(study_id)),
        "epsilon": float(budget.spent_epsilon(config.privacy, study_id)),
    }


def site_round_reply(
    weights: dict[str, torch.Tensor],
    sent: Mapping[str, object],
    node_config: NodeConfig,
    secure: bool = False,
) -> tuple[dict[str, np.ndarray], int, dict[str, float | int | str]]:
    """(delta per key, subjects, metrics) for the server's instruction (Flower-free to test).

    `secure`: the instruction came through SecAgg+. Raises SiteStop (a fixed reason code)
    whenever the site does not send an update; details go to the site's log only.
    """
    # torch, MONAI and Opacus load only here: Flower starts a ClientApp process per
    # message, and READY and the SecAgg+ stages other than training need none of them
    from fedsynth.client.site_round import ModelMismatch, run_site_round
    from fedsynth.common.models import resolve_device

    config, round_number = _study(sent)
    settings = _settings(sent, node_config, config)
    if (settings.state_dir / FAILED).is_file():
        raise refuse(settings, "failed-before", f"{settings.state_dir / FAILED} exists")
    check_terms(settings, config, secure)
    budget = _budget(settings)
    study_id = str(sent.get("study-id", ""))
    rounds_before = len(budget.history())
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
            max_subjects=float(sent.get("max-weight", 0.0) or 0.0),  # type: ignore[arg-type]
            check_subjects=lambda n: check_delta_for_subjects(settings, config.privacy.delta, n),
            study_id=study_id,
            checkpoint_sha256=str(sent.get("checkpoint-sha256", "")),  # none sent: refused
        )
    except SiteStop:
        raise
    except BudgetRefusal as refusal:
        raise refuse(settings, "budget-spent", str(refusal)) from None
    except ModelMismatch as mismatch:  # before anything was read or spent
        raise refuse(settings, "model", str(mismatch)) from None
    except Exception as error:  # every failure becomes a code; details stay here
        spent = len(budget.history()) > rounds_before
        code = "internal" if spent or not isinstance(error, FedsynthError) else "data"
        detail = str(error) if isinstance(error, FedsynthError) else traceback.format_exc()
        _fail(settings, round_number, code, detail, spent)
    plan = update.plan
    delta = {
        k: (update.weights[k].detach().cpu() - v).numpy()
        if v.is_floating_point()
        else np.zeros_like(v.numpy())
        for k, v in weights.items()
    }
    problem = _unsendable(delta, float(sent.get("clipping-range", 0.0) or 0.0))  # type: ignore[arg-type]
    if problem:
        _fail(settings, round_number, "update", problem, spent=True)
    metrics: dict[str, float | int | str] = {
        "site": settings.name,
        "noise_multiplier": float(plan.noise_multiplier),
        "sample_rate": float(plan.sample_rate),
        "steps": int(plan.steps),
        "subjects": int(plan.subjects),
        "delta": float(plan.delta),
        "accountant": config.privacy.accountant,
        "history": json.dumps(budget.history(study_id)),
        "signed": json.dumps(budget.signed(study_id)),
        "epsilon": float(budget.spent_epsilon(config.privacy, study_id)),
    }
    return delta, int(plan.subjects), metrics


def _fail(
    settings: SiteSettings, round_number: int, code: str, detail: str, spent: bool
) -> NoReturn:
    """Stop the round; after a spend, mark the site failed so it is not selected again."""
    if spent:
        atomic_write_text(
            settings.state_dir / FAILED,
            json.dumps({"round": round_number, "code": code, "detail": detail}) + "\n",
        )
        detail += f" (spend recorded: {FAILED} written; remove it once the cause is fixed)"
    raise refuse(settings, code, f"round {round_number}: {detail}") from None


def _unsendable(delta: dict[str, np.ndarray], clip: float) -> str:
    """Why the update cannot leave the site ('' when it can): a non-finite value anywhere
    (`nan > clip` is false, so it is checked first), or, under SecAgg+ (clip > 0), a value
    beyond the clipping range, which SecAgg+ would silently clip."""
    for key, d in delta.items():
        if d.size and not np.isfinite(d).all():
            return f"non-finite values in the update of {key}"
    if clip > 0:
        largest = max((float(np.abs(d).max()) for d in delta.values() if d.size), default=0.0)
        if largest > clip:
            return (
                f"largest |weight delta| {largest:.4g} exceeds the secure aggregation clipping "
                f"range {clip:g}: raise the server's run config secagg-clipping-range"
            )
    return ""


class SiteClient(NumPyClient):
    """The legacy client SecAgg+ needs: parameters in `keys` order in, deltas out."""

    def __init__(self, node_config: NodeConfig) -> None:
        self.node_config = node_config

    def fit(self, parameters, config):
        import torch

        if "OMP_NUM_THREADS" not in os.environ:  # simulated sites share the machine's cores
            torch.set_num_threads(1)
        keys = json.loads(str(config["keys"]))
        weights = {k: torch.from_numpy(np.array(a)) for k, a in zip(keys, parameters, strict=True)}
        delta, subjects, metrics = site_round_reply(
            weights, config, self.node_config, secure=_MASKED.get()
        )
        return [delta[k] for k in keys], subjects, metrics


def site_guard(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Let no exception text leave the site but a SiteStop's fixed one (the SuperNode's
    console shows fedsynth's log: the first mod is where the ClientApp starts)."""
    show_on_console()
    try:
        return call_next(msg, ctxt)
    except SiteStop:
        raise
    except Exception:  # the text may carry site data: log it here only
        log.exception("the ClientApp failed (the server is told: internal)")
        raise SiteStop("internal") from None


def answer_ready(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Answer the server's READY query; pass every other message on."""
    if (
        msg.metadata.message_type == MessageType.QUERY
        and READY_RECORD in msg.content.config_records
    ):
        sent = dict(msg.content.config_records[READY_RECORD])
        answer = ready_answer(sent, ctxt.node_config)
        # Flower only copies the values; its dict[str, ConfigRecordValues] is needlessly invariant
        return Message(RecordDict({READY_RECORD: ConfigRecord(answer)}), reply_to=msg)  # type: ignore[arg-type]
    return call_next(msg, ctxt)


def secure_aggregation_when_asked(
    msg: Message, ctxt: Context, call_next: ClientAppCallable
) -> Message:
    """SecAgg+ for the server's SecAgg+ messages; plain train messages pass through."""
    if (
        msg.metadata.message_type == MessageType.TRAIN
        and RECORD_KEY_CONFIGS in msg.content.config_records
    ):
        check_secagg_setup(msg.content.config_records[RECORD_KEY_CONFIGS])

        def masked_fit(m: Message, c: Context) -> Message:
            token = _MASKED.set(True)
            try:
                return _widened(call_next(m, c))
            finally:
                _MASKED.reset(token)

        return secaggplus_mod(msg, ctxt, masked_fit)
    return call_next(msg, ctxt)


def check_secagg_setup(configs: Mapping[str, object]) -> None:
    """At SecAgg+'s setup stage, refuse (SiteStop "terms") parameters under which the
    server could unmask one site: fewer than 2 sites sampled or a threshold below 2
    (Flower's secaggplus_mod accepts both)."""
    if configs.get(SecAggKey.STAGE) != Stage.SETUP:
        return
    sampled, threshold = configs.get(SecAggKey.SAMPLE_NUMBER), configs.get(SecAggKey.THRESHOLD)
    if not isinstance(sampled, int) or not isinstance(threshold, int):
        raise refuse(None, "terms", "SecAgg+ setup without sample number or threshold")
    if sampled < 2 or threshold < 2:
        raise refuse(None, "terms", f"SecAgg+ setup with {sampled} sites and threshold {threshold}")


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


def client_fn(context: Context) -> Client:
    return SiteClient(context.node_config).to_client()


app = ClientApp(client_fn=client_fn, mods=[site_guard, answer_ready, secure_aggregation_when_asked])
