"""`fedsynth study dp-audit`: an empirical privacy audit of the DP-SGD the sites run, in one
training run (Steinke, Nasr & Jagielski, NeurIPS 2023, arXiv:2305.08846).

m canary subjects (simulations/canaries.py: each a gradient of the clip's norm on its
own weight) join the first phantom site, each with probability 1/2; the study then runs as
`flwr run .` trains (every site, every round, the config's DP-SGD: sampling, clipping,
noise and optimiser, in process: simulations/federated.py). The auditor sees only the
public checkpoint and the final global model, as anyone holding a release does, and the
canaries it planted: it scores each canary by how far its weight moved the way the
canary pushes it, guesses "in" for the highest scores and "out" for the lowest, abstains
on the rest, and turns the number of right guesses into an epsilon lower bound at 95%
confidence (simulations/audit_bound.py). A bound above the claimed epsilon means the
implementation leaks more than it claims (with the noise switched off, `--no-noise`, it
must). A bound below it shows only that this audit did not find a leak: the bound is
loose at small m, and with a few hundred canaries it cannot exceed about 3 whatever the
training does (`largest_certifiable`, reported as the audit's power).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from fedsynth.client.audit import roc_auc
from fedsynth.common.models import trainable_names
from fedsynth.simulations.arms import Arm, StudyContext, StudySetup
from fedsynth.simulations.audit_bound import epsilon_lower_bound, largest_certifiable
from fedsynth.simulations.canaries import AuditPlan, canary_scores, make_canaries
from fedsynth.simulations.federated import federate

log = logging.getLogger(__name__)


def guess(scores: np.ndarray, guesses: int) -> np.ndarray:
    """+1 (in) for the guesses/2 highest scores, -1 (out) for the guesses/2 lowest, 0
    (abstain) for the rest; ties broken by canary order. scores (m,), guesses even <= m."""
    order = np.argsort(-scores, kind="stable")
    half = guesses // 2
    out = np.zeros(len(scores), dtype=int)
    out[order[:half]] = 1
    out[order[len(scores) - half :]] = -1
    return out


def audit_once(context: StudyContext, plan: AuditPlan, seed: int) -> dict:
    """One audited training run: its counts, bound and the canaries' scores."""
    config = context.setup.config
    privacy = config.privacy
    first = context.names[0]
    arm = Arm(tuple(context.names), None if plan.no_noise else privacy.target_epsilon)
    run_config = context.config_for(arm)
    names = trainable_names(context.pretrained.unet, run_config.privacy.trainable)
    shapes = {name: context.public[name].shape for name in names}
    canaries = make_canaries(shapes, plan.canaries, privacy.max_grad_norm, seed)
    started = time.perf_counter()
    run = federate(
        run_config,
        context.public,
        context.pretrained.unet,
        context.sites,
        private=not plan.no_noise,
        seed=seed,
        label=f"dp-audit (seed {seed}): ",
        given={first: canaries},
    )
    scores = canary_scores(canaries, context.public, run.weights).numpy()
    guesses = guess(scores, plan.guesses)
    member = canaries.included.numpy()
    made = guesses != 0
    correct = int((guesses[made] == np.where(member, 1, -1)[made]).sum())
    bound = epsilon_lower_bound(
        plan.canaries, int(made.sum()), correct, privacy.delta, plan.confidence
    )
    log.info("dp-audit (seed %d): %d of %d guesses right", seed, correct, int(made.sum()))
    return {
        "seed": seed,
        "epsilon_lower_bound": bound,
        "correct": correct,
        "guesses": int(made.sum()),
        "abstained": int((~made).sum()),
        "included": int(member.sum()),
        "noise_multiplier": run.noise[first],
        "auc": roc_auc(scores[member], scores[~member]),
        "scores_in": scores[member].tolist(),
        "scores_out": scores[~member].tolist(),
        "seconds": time.perf_counter() - started,
    }


def dp_audit(setup: StudySetup) -> dict:
    """The audit of `setup.seeds[0]`'s run (top level) and of any further seeds (`repeats`,
    each an independent run with its own canaries: a bound is per run, not a maximum
    over runs, which would hold at a lower confidence). `setup.audit` says how."""
    plan = setup.audit
    started = time.perf_counter()
    context = StudyContext(setup)
    privacy = setup.config.privacy
    runs = [audit_once(context, plan, seed) for seed in setup.seeds]
    return {
        "epsilon_claimed": privacy.target_epsilon,
        "delta": privacy.delta,
        "confidence": plan.confidence,
        "canaries": plan.canaries,
        "noise": "off (calibration of the audit)" if plan.no_noise else "as configured",
        "largest_certifiable": largest_certifiable(
            plan.canaries, plan.guesses, privacy.delta, plan.confidence
        ),
        **runs[0],
        "repeats": runs[1:],
        "seconds": time.perf_counter() - started,
    }
