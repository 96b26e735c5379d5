"""The coordinator's Flower ServerApp: prepare the study, run its rounds, summarise.

`build_app(simulate)` makes the ServerApp; `app` (this module) is the one for studies
with real sites (run config `checkpoint` names the public checkpoint), and
fedsynth.simulations.server_app:app, the one `flwr run .` names, adds the simulation's
phantom sites. The round loop is server/strategy.py; the ledger server/privacy_ledger.py;
the run dir server/run_dir.py; SecAgg+ parameters server/secure_aggregation.py.
"""

from __future__ import annotations

import json

import torch
from flwr.app import Context
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow
from flwr.server.workflow.default_workflows import default_fit_workflow
from flwr.serverapp import Grid, ServerApp

from fedsynth.common.checkpoint import load_pretrained
from fedsynth.common.config import Config
from fedsynth.common.errors import FedsynthError
from fedsynth.common.models import trainable_names
from fedsynth.server.run_dir import ledger_table, resume_point, write_summary
from fedsynth.server.secure_aggregation import StudySecAggPlus, secagg_settings
from fedsynth.server.strategy import RoundFit, StudyStrategy
from fedsynth.server.study import Simulate, Study, prepare
from fedsynth.server.validation import validation_text


def travelling_keys(
    config: Config, unet: torch.nn.Module, weights: dict[str, torch.Tensor]
) -> list[str]:
    """The UNet tensors that go to the sites and back: the trainable subset of `unet` (the
    public checkpoint's), each of which the global `weights` must hold."""
    names = trainable_names(unet, config.privacy.trainable)
    missing = [k for k in names if k not in weights]
    if missing:
        raise FedsynthError(f"the global UNet has no {missing[0]}: not a UNet of this config")
    return names


def _check_frozen(
    weights: dict[str, torch.Tensor],
    public: dict[str, torch.Tensor],
    keys: list[str],
    config: Config,
) -> None:
    """The global UNet outside the tensors that travel must be the public checkpoint's,
    which is what the sites fill in: a study resumed with another privacy.trainable than
    it trained is refused here, before any site spends on a model the server does not
    hold."""
    travelling = set(keys)
    if any(not torch.equal(v, public[k]) for k, v in weights.items() if k not in travelling):
        raise FedsynthError(
            "the study's global UNet differs from the public checkpoint outside "
            f"privacy.trainable {config.privacy.trainable!r}, which the sites fill in from "
            "their copies: resume it with the privacy.trainable it was trained with"
        )


def run_federation(grid: Grid, study: Study, context: Context, whole_unet: bool = False) -> dict:
    """Run the study's remaining rounds over `grid`; returns the summary (summary.json).
    `whole_unet`: every UNet tensor travels, not only the trainable subset (what it costs
    is a bench figure; the training is the same)."""
    config = study.config
    done, weights = resume_point(study)
    unet = load_pretrained(study.checkpoint).unet
    public = unet.state_dict()
    weights = public if weights is None else weights
    keys = list(weights) if whole_unet else travelling_keys(config, unet, weights)
    _check_frozen(weights, public, keys, config)
    strategy = StudyStrategy(study, weights, done, keys)
    if done == 0:  # the public checkpoint: the baseline of every later round
        validated = validation_text(strategy.validate(0))
        if validated:
            print(f"[fedsynth] round 0 (public checkpoint): {validated}", flush=True)
    remaining = config.federation.rounds - done
    if remaining > 0:
        if config.federation.secure_aggregation:
            fit = StudySecAggPlus(**secagg_settings(study))
        else:
            fit = default_fit_workflow
        workflow = DefaultWorkflow(fit_workflow=RoundFit(fit, strategy))
        legacy = LegacyContext(context, ServerConfig(num_rounds=remaining), strategy)
        try:
            workflow(grid, legacy)
        except BaseException:
            strategy.finish_validation(cancel=True)
            raise
        strategy.finish_validation()
    strategy.site_domain_fidelity(done + strategy.settled)
    return write_summary(study, done + strategy.settled, strategy.over)


def build_app(simulate: Simulate | None = None) -> ServerApp:
    """A ServerApp whose studies get their data from `simulate` when no checkpoint is named."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            study = prepare(dict(context.run_config), context.run_id, simulate)
            print(f"[fedsynth] run dir {study.run_dir}", flush=True)
            summary = run_federation(grid, study, context)
        except FedsynthError as error:
            print(f"[fedsynth] error: {error}", flush=True)
            raise SystemExit(1) from None
        print(ledger_table(summary), flush=True)
        print(f"[fedsynth] study done: {json.dumps(summary)}", flush=True)

    return app


app = build_app()
