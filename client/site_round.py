"""One training round at a site, in the order the privacy model needs.

1. Refuse from the ledger alone if the site's budget is spent (no data read yet).
2. Load (or encode once and cache) the site's latents with the frozen public autoencoder.
3. Plan this round's noise from the site's public subject count (client/public_size.py:
   the rate and the weight reveal only that size, never the real count) and its ledger.
4. Train with DP-SGD from the global weights (and, with `training.finetune-optimizer-state:
   keep`, the optimiser moments this site kept from its previous round of the study:
   client/optimizer_state.py).
5. Append the round to the site's ledger, fsync'd, and only then hand the update back.
   The line also holds the DP-SGD's wall-clock start and end (`dp_sgd`, Unix seconds):
   the site's own record of where a round's time went (never sent: READY and the reply
   carry only the privacy history); `fedsynth bench` reads it in simulations.
Steps 3 to 5 hold the site's ledger lock, so two ClientApps sharing a state dir (two
studies on one SuperNode) see each other's spend: the second plans after the first's
round is on the ledger.

The Flower ClientApp wraps this; keeping it free of Flower lets a hospital's process be
killed and restarted at any step without losing or double-counting spend.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from fedsynth.client.budget import RoundPlan, SiteBudget
from fedsynth.client.dp_trainer import RoundResult, train_round
from fedsynth.client.latents import site_latents
from fedsynth.client.node_config import SiteSettings
from fedsynth.client.optimizer_state import keep, load_kept
from fedsynth.client.public_size import DeclaredSizeRefused, subject_count
from fedsynth.client.site_terms import refuse
from fedsynth.common.checkpoint import Pretrained, load_pretrained, public_sha256
from fedsynth.common.config import Config
from fedsynth.common.errors import FedsynthError
from fedsynth.common.io import private_dir
from fedsynth.common.ledger import ledger_lock
from fedsynth.common.models import trainable_names


class ModelMismatch(FedsynthError):
    """The server's weights do not fit this site's public checkpoint (reason `model`)."""


def _global_state(
    pretrained: Pretrained,
    config: Config,
    sent: dict[str, torch.Tensor],
    checkpoint_sha256: str,
) -> dict[str, torch.Tensor]:
    """The global UNet: the site's public checkpoint with the sent tensors in place."""
    unet = pretrained.unet
    state = unet.state_dict()
    unknown = sorted(set(sent) - set(state))
    if unknown:
        raise ModelMismatch(f"the server sent tensors this UNet does not have: {unknown[:3]}")
    wrong = [
        k
        for k, v in sent.items()
        if tuple(v.shape) != tuple(state[k].shape) or v.dtype != state[k].dtype
    ]
    if wrong:
        raise ModelMismatch(
            f"the server's tensors have other shapes or types than this UNet's: {wrong[:3]}"
        )
    missing = [k for k in trainable_names(unet, config.privacy.trainable) if k not in sent]
    if missing:
        raise ModelMismatch(
            f"the server did not send {len(missing)} tensors of the trainable subset "
            f"{config.privacy.trainable!r} (e.g. {missing[0]})"
        )
    frozen = [k for k in state if k not in sent]
    if public_sha256(pretrained.folder, state, frozen) != checkpoint_sha256:
        raise ModelMismatch(
            "this site's public checkpoint differs from the server's (config, latent "
            "statistics, autoencoder or the UNet weights that are not trained: their SHA-256 "
            "differs): use the checkpoint folder the study was built on, unchanged"
        )
    return {**state, **sent}


@dataclass(frozen=True)
class SiteUpdate:
    """The trained UNet weights, what the round cost, and how training went (stays here)."""

    weights: dict[str, torch.Tensor]
    plan: RoundPlan
    result: RoundResult


_OBSERVERS: list[Callable[[SiteUpdate], None]] = []


@contextlib.contextmanager
def observe_site_rounds(observer: Callable[[SiteUpdate], None]) -> Iterator[None]:
    """Call `observer` with every SiteUpdate this process produces while in the block.

    In process only (the bench reads `update.result.seconds`, the DP-SGD wall time): it
    sends nothing and changes nothing, and a real site never installs one. The observer
    runs after the site's ledger line is written; an observer that raises fails the round.
    """
    _OBSERVERS.append(observer)
    try:
        yield
    finally:
        _OBSERVERS.remove(observer)


def run_site_round(
    settings: SiteSettings,
    config: Config,
    checkpoint: str | Path,
    global_weights: dict[str, torch.Tensor],
    round_number: int,
    device: torch.device | str = "cpu",
    seed: int | None = None,
    show_progress: bool = False,
    max_subjects: float = 0.0,
    check_subjects: Callable[[int], None] | None = None,
    study_id: str = "",
    checkpoint_sha256: str = "",
) -> SiteUpdate:
    """Train one round at this site; raises BudgetRefusal before reading data when spent.

    `global_weights` holds the tensors the server sent: the trainable subset (or every
    UNet tensor), which must cover the config's trainable subset; the rest comes from the
    site's own copy of the public checkpoint, which must hash as the server's does
    (`checkpoint_sha256`, common.checkpoint.public_sha256, over the tensors not sent),
    else ModelMismatch before anything is read or spent.

    `seed` None (real rounds) draws a secret seed; tests pass one to be reproducible.
    The site's weight (`plan.subjects`) and rate are those of its public size m
    (public_size.subject_count); a declared public-subjects above its real count, or
    without a max-delta below 1/n, is refused (SiteStop `config`, the numbers in the
    site's log only) before anything is spent, whatever the study asks. `max_subjects`
    > 0 (SecAgg+'s max weight) refuses a site whose weight m is larger before it trains
    or spends anything: its weight could not be carried.
    `check_subjects(n)` (the site's own terms that need its real subject count) runs
    before the round is planned. `study_id` is recorded with the round: a site reports
    each study's rounds to that study only.
    """
    if not config.privacy.enabled:
        raise FedsynthError("privacy.enabled is false: sites train only with DP-SGD")
    private_dir(settings.state_dir)  # owner-only, tightened if it was not
    budget = SiteBudget(settings.name, settings.state_dir, settings.max_epsilon)
    budget.refuse_if_exhausted(config.privacy)
    pretrained = load_pretrained(checkpoint, device)
    start = _global_state(pretrained, config, global_weights, checkpoint_sha256)
    site = site_latents(
        pretrained, checkpoint, settings.data_path, settings.state_dir, show_progress
    )
    try:
        count = subject_count(settings, site.n_subjects)
    except DeclaredSizeRefused as error:
        raise refuse(settings, "config", f"{error} (nothing was trained or spent)") from None
    if max_subjects and count.public > max_subjects:
        raise FedsynthError(
            f"{settings.name}: its weight ({count.public} subjects) exceeds the secure "
            f"aggregation max weight {max_subjects:g}: raise the server's run config "
            "secagg-max-weight (nothing was trained or spent)"
        )
    if check_subjects is not None:  # the site's own terms that depend on its size
        check_subjects(site.n_subjects)
    keeps = config.training.finetune_optimizer_state == "keep"
    kept = load_kept(settings.state_dir, study_id) if keeps else None
    # plan to append under one lock: another ClientApp sharing this state dir (a
    # second study) must not plan against the same spend before this round is on it
    with ledger_lock(budget.ledger_path):
        plan = budget.plan_round(config, count, round_number)
        unet = pretrained.unet
        unet.load_state_dict(start)
        started = time.time()
        result = train_round(
            unet,
            site.latents,
            site.attributes,
            site.subjects,
            config,
            plan.noise_multiplier,
            plan.sample_rate,
            plan.steps,
            seed=seed,
            device=device,
            public_subjects=count.public,
            optimizer_state=kept,
        )
        budget.record(
            round_number,
            plan,
            study=study_id,
            accountant=config.privacy.accountant,
            dp_sgd=[started, time.time()],
        )
    if keeps:  # after the spend is on the ledger: a crash here only loses the moments
        keep(settings.state_dir, study_id, result.optimizer_state)
    update = SiteUpdate({k: v.detach().cpu() for k, v in unet.state_dict().items()}, plan, result)
    for observer in list(_OBSERVERS):
        observer(update)
    return update
