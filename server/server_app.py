"""fedsynth's one Flower ServerApp: prepare the study, run its rounds, summarise.

The same app runs a `flwr run .` simulation and a study with real hospitals; run config
`data` chooses ("phantoms", pyproject's default: generated phantom sites; "sites": real
sites, with the public `checkpoint` named), as Flower's example apps choose simulation or
deployment by federation, not by app (server/study.py). The round loop: READY
(server/readiness.py), the fit step (server/round_fit.py) and the strategy
(server/strategy.py), which charges the ledger (server/round_charges.py,
server/privacy_ledger.py), aggregates (server/aggregation.py) and validates
(server/round_validation.py); the run dir is server/run_dir.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from flwr.app import Context
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow
from flwr.server.workflow.default_workflows import default_fit_workflow
from flwr.serverapp import Grid, ServerApp

from fedsynth.common.checkpoint import load_pretrained
from fedsynth.common.config import Config
from fedsynth.common.errors import FedsynthError
from fedsynth.common.logs import show_on_console
from fedsynth.common.models import ConditionedUNet, trainable_names
from fedsynth.server.round_fit import RoundFit
from fedsynth.server.round_validation import RoundValidation
from fedsynth.server.run_dir import SUMMARY, ledger_table, resume_point, write_summary
from fedsynth.server.secure_aggregation import StudySecAggPlus, secagg_settings
from fedsynth.server.strategy import StudyStrategy
from fedsynth.server.study import Study, prepare

log = logging.getLogger(__name__)


def travelling_keys(
    config: Config, unet: ConditionedUNet, weights: dict[str, torch.Tensor]
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
    validation = RoundValidation(study)
    strategy = StudyStrategy(study, weights, done, keys, validation)
    if done == 0:  # the public checkpoint: the baseline of every later round
        validation.public_checkpoint(strategy.weights)
    remaining = config.federation.rounds - done
    if remaining > 0:
        fit: Callable[[Grid, Context], None]
        if config.federation.secure_aggregation:
            fit = StudySecAggPlus(**secagg_settings(study))
        else:
            fit = default_fit_workflow
        workflow = DefaultWorkflow(fit_workflow=RoundFit(fit, strategy))
        legacy = LegacyContext(context, ServerConfig(num_rounds=remaining), strategy)
        try:
            workflow(grid, legacy)
        except BaseException:
            validation.finish(cancel=True)
            raise
        validation.finish()
    validation.final_fidelity(done + strategy.settled, strategy.weights)
    validation.ceiling_share(done + strategy.settled)
    return write_summary(study, done + strategy.settled, strategy.over)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the study the run config describes; a FedsynthError ends it in one line."""
    show_on_console()
    try:
        study = prepare(dict(context.run_config), context.run_id)
        log.info("run dir %s", study.run_dir)
        summary = run_federation(grid, study, context)
    except FedsynthError as error:
        log.error("%s", error)
        raise SystemExit(1) from None
    log.info("%s", ledger_table(summary))
    log.info(
        "study done: %d of %d rounds; run dir %s; summary %s",
        summary["rounds_done"],
        study.config.federation.rounds,
        study.run_dir,
        study.run_dir / SUMMARY,
    )
