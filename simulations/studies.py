"""The studies of docs/results.md, each one function of a `StudySetup` (`fedsynth study NAME`).

Every study runs on the simulation's own data (the phantom sites `flwr run .` trains on,
its public checkpoint, held-out subjects of each site's profile), federates its arms in
process (simulations/arms.py) and measures with the simulation-only site-domain loss: the
fixed-noise diffusion loss on every site's held-out subjects, lower is better. Results are
plain dicts (JSON); study_views.py turns them into tables and figures.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from fedsynth.simulations.arms import Arm, StudyContext, StudySetup, mean_loss, summary
from fedsynth.simulations.downstream import downstream
from fedsynth.simulations.dp_audit import dp_audit
from fedsynth.simulations.gradient_signal import signal
from fedsynth.simulations.study_montage import write_site_montages

PRIVACY_LEVELS = (1.0, 5.0, 10.0, None)  # epsilon per site; None: the same steps, no noise
TRAINABLE = ("attention", "norms", "norms+attention", "all")
TRAINABLE_LEVELS = (1.0, 10.0, None)


def _share(public: float, private: float, reference: float) -> float:
    """The part of the non-private gain DP recovers: (public - DP) / (public - non-private)."""
    gap = public - reference
    return (public - private) / gap if gap > 0 else math.nan


def _final(result: dict) -> dict[str, float]:
    """Per site, the loss after the last round, with the sites' mean under "mean"."""
    last = result["loss"][-1]
    return {**last, "mean": mean_loss(last)}


def dp_gap(setup: StudySetup) -> dict:
    """Federated DP finetuning against the same steps without noise and against the
    non-private ceiling, per site.

    For each seed: the study's rounds with DP-SGD (noise planned for the target epsilon),
    the same rounds with noise 0, both from the public checkpoint, and the ceiling
    (simulations/ceiling.py: every UNet weight on the pooled sites' subjects without
    privacy, its best held-out check; one finetune, seeded by the first seed: it is the
    bar every seed's DP arm is measured against); each site's held-out site-profile loss.
    share = (public - DP) / (public - same steps without noise), ceiling_share =
    (public - DP) / (public - ceiling): 1 means DP reached the reference, 0 that the
    sites' data did not move the model. The fidelity with its spread over sampling seeds
    (SiteDomain.fidelity_spread) is measured for the public checkpoint and the first
    seed's DP and ceiling models, whose samples also fill the montages when
    `setup.figures` names a folder.
    """
    started, context = time.perf_counter(), StudyContext(setup)
    everyone, first = tuple(context.names), setup.seeds[0]
    dp_arm, plain_arm = Arm(everyone, setup.config.privacy.target_epsilon), Arm(everyone, None)
    runs, models = [], {"public": context.public}
    fidelity = {"public": context.fidelity(context.public, "public")}
    for seed in setup.seeds:
        keep = seed == first
        arms = {
            "dp": context.run(dp_arm, seed, keep_weights=keep),
            "nonprivate": context.run(plain_arm, seed),
        }
        if keep:
            ceiling = context.ceiling(seed, keep_weights=True)
            models |= {"DP": arms["dp"].pop("weights"), "ceiling": ceiling.pop("weights")}
            fidelity["dp"] = context.fidelity(models["DP"], context.key(dp_arm, seed))
            fidelity["ceiling"] = context.fidelity(models["ceiling"], context.ceiling_key(seed))
        public, dp = arms["dp"]["loss"][0], arms["dp"]["loss"][-1]
        reference, best = arms["nonprivate"]["loss"][-1], ceiling["best"]
        runs.append(
            {
                "seed": seed,
                **arms,
                "ceiling": ceiling,
                "share": {s: _share(public[s], dp[s], reference[s]) for s in public},
                "share_of_mean_loss": _share(*(mean_loss(v) for v in (public, dp, reference))),
                "ceiling_share": {s: _share(public[s], dp[s], best[s]) for s in public},
                "ceiling_share_of_mean_loss": _share(*(mean_loss(v) for v in (public, dp, best))),
            }
        )
    montages = []
    if setup.figures is not None:
        montages = write_site_montages(context.site_domain, models, setup.figures, "dp-gap")
    return summary(
        "dp-gap",
        setup,
        started,
        runs=runs,
        share_of_mean_loss=[r["share_of_mean_loss"] for r in runs],
        mean_site_share=[_mean(r["share"]) for r in runs],
        ceiling_share_of_mean_loss=[r["ceiling_share_of_mean_loss"] for r in runs],
        mean_site_ceiling_share=[_mean(r["ceiling_share"]) for r in runs],
        ceiling_best_step=runs[0]["ceiling"]["best_step"],
        ceiling_plan=runs[0]["ceiling"]["plan"],
        fidelity={
            "models_of_seed": first,
            "sampling_seeds": context.site_domain.sampling_seeds(),
            "volumes_per_site": {s: len(rows) for s, rows in context.site_domain.rows.items()},
            **fidelity,
        },
        montages=[path.name for path in montages],
    )


def _levers(config, subjects: int) -> dict[str, dict]:
    """Arm settings of each lever against the config's default study (`Arm` fields);
    `subjects`: each site's."""
    clip, rounds = config.privacy.max_grad_norm, config.federation.rounds
    rate = config.training.finetune_learning_rate
    # an arm's rate scales FedAdam's with it (StudyContext.config_for); FedAvg's stays
    scaled = ", FedAdam's alike" if config.federation.server_optimizer == "adam" else ""
    levers: dict[str, dict] = {"the config's study": {}}
    if config.privacy.sample_rate is None and (
        config.privacy.batch_size < subjects or config.privacy.local_steps > 1
    ):
        full_batch = (("privacy.batch-size", subjects), ("privacy.local-steps", 1))
        levers["one full-batch step a round"] = {"overrides": full_batch}
    if config.privacy.trainable != "norms":
        levers["norms only"] = {"trainable": "norms"}
    if config.training.finetune_optimizer_state == "keep" and rounds > 1:
        fresh = (("training.finetune-optimizer-state", "fresh"),)
        levers["the sites' optimiser fresh each round"] = {"overrides": fresh}
    return levers | {
        "clip 1": {"overrides": (("privacy.max-grad-norm", 1.0),)},
        f"clip {clip * 0.3:.2g}": {"overrides": (("privacy.max-grad-norm", clip * 0.3),)},
        f"{2 * rounds} rounds": {"overrides": (("federation.rounds", 2 * rounds),)},
        f"sites' rate x3 ({3 * rate:.2g}{scaled})": {"learning_rate": 3 * rate},
        "4 loss draws (noise multiplicity)": {"overrides": (("privacy.loss-draws", 4),)},
    }


def levers(setup: StudySetup) -> dict:
    """What moves the DP study toward the non-private ceiling: the config's study and one
    lever changed at a time (one full-batch step a round instead of the config's small
    Poisson batches, the normalisation weights alone, the sites' optimiser started fresh
    each round instead of continuing its kept moments, the clip, twice the rounds, three
    times the sites' rate, noise multiplicity), each at the config's epsilon, with its
    share of the ceiling's gain in the sites' mean loss and its DP-SGD seconds; and the
    public checkpoint trained on its own public subjects as the ceiling trains (no site
    data: what more training alone gives). The ceiling is the first seed's, as in dp-gap."""
    started, context = time.perf_counter(), StudyContext(setup)
    epsilon, everyone = setup.config.privacy.target_epsilon, tuple(context.names)
    ceiling = context.ceiling(setup.seeds[0])
    public_only = context.ceiling(setup.seeds[0], public_only=True)
    runs = []
    for seed in setup.seeds:
        rows = []
        for name, fields in _levers(setup.config, setup.subjects).items():
            result = context.run(Arm(everyone, epsilon, **fields), seed)
            public, final = (mean_loss(result["loss"][k]) for k in (0, -1))
            rows.append(
                {
                    "lever": name,
                    "public": public,
                    "loss": final,
                    "ceiling_share": _share(public, final, mean_loss(ceiling["best"])),
                    "seconds": result["seconds"],
                }
            )
        runs.append({"seed": seed, "rows": rows})
    public = mean_loss(ceiling["checks"][0]["loss"])
    more = mean_loss(public_only["best"])
    return summary(
        "levers",
        setup,
        started,
        epsilon=epsilon,
        ceiling={"loss": mean_loss(ceiling["best"]), "best_step": ceiling["best_step"]},
        public_only={
            "loss": more,
            "best_step": public_only["best_step"],
            "ceiling_share": _share(public, more, mean_loss(ceiling["best"])),
        },
        runs=runs,
    )


def _mean(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values)


def federation(setup: StudySetup) -> dict:
    """Each site alone against all sites federated against the sites' subjects pooled at
    one curator (central DP), every arm at the config's per-subject epsilon, each measured
    on every site's held-out subjects. Federation is worth it when it beats every single
    site on the sites' mean loss; pooling is the upper bound a federation approaches."""
    started, context = time.perf_counter(), StudyContext(setup)
    epsilon, everyone = setup.config.privacy.target_epsilon, tuple(context.names)
    arms = {f"{name} alone": Arm((name,), epsilon) for name in context.names}
    arms |= {"federated": Arm(everyone, epsilon), "pooled": Arm(everyone, epsilon, pooled=True)}
    runs = []
    for seed in setup.seeds:
        results = {label: context.run(arm, seed) for label, arm in arms.items()}
        final = {label: _final(r) for label, r in results.items()}
        public = results["federated"]["loss"][0]
        singles = [final[f"{name} alone"]["mean"] for name in context.names]
        runs.append(
            {
                "seed": seed,
                "public": {**public, "mean": mean_loss(public)},
                "final": final,
                "federated_beats_every_site": final["federated"]["mean"] < min(singles),
                "seconds": {label: r["seconds"] for label, r in results.items()},
            }
        )
    return summary(
        "federation",
        setup,
        started,
        epsilon=epsilon,
        runs=runs,
        federated_beats_every_site=all(r["federated_beats_every_site"] for r in runs),
    )


def pretraining(setup: StudySetup) -> dict:
    """The public checkpoint against a UNet initialised from the seed (every weight trained:
    a random network has nothing for a subset to adapt), federated over all sites at
    epsilon 1, 5, 10 and without noise, the same rounds and steps. Paper: FID 26.77
    pretrained vs 92.52 from scratch at epsilon 10 (Daum et al. 2024, table 2)."""
    started, context = time.perf_counter(), StudyContext(setup)
    everyone = tuple(context.names)
    runs = []
    for seed in setup.seeds:
        rows = []
        for epsilon in PRIVACY_LEVELS:
            public = context.run(Arm(everyone, epsilon), seed)
            scratch = context.run(Arm(everyone, epsilon, trainable="all", start="scratch"), seed)
            rows.append(
                {
                    "epsilon": epsilon,
                    "public": {"start": mean_loss(public["loss"][0]), **_final(public)},
                    "scratch": {"start": mean_loss(scratch["loss"][0]), **_final(scratch)},
                    "seconds": {"public": public["seconds"], "scratch": scratch["seconds"]},
                }
            )
        runs.append({"seed": seed, "rows": rows})
    return summary("pretraining", setup, started, runs=runs)


def subset_learning_rates(context: StudyContext) -> dict[str, tuple[int, float]]:
    """Per subset: its number of trained weights d and a learning rate giving the same
    update norm per step as the config's subset at the config's rate. AdamW's first step
    (each round restarts it) moves every trained weight by about +-lr, a norm of lr*sqrt(d),
    so lr scales as 1/sqrt(d); one rate for all subsets would make the larger ones jump."""
    from fedsynth.client.dp_trainer import trainable_parameters
    from fedsynth.common.models import ConditionedUNet

    config = context.setup.config
    unet = ConditionedUNet(config)  # a copy: choosing a subset sets requires_grad
    sizes = {name: sum(p.numel() for p in trainable_parameters(unet, name)) for name in TRAINABLE}
    base = config.training.finetune_learning_rate * math.sqrt(sizes[config.privacy.trainable])
    return {name: (d, base / math.sqrt(d)) for name, d in sizes.items()}


def trainable(setup: StudySetup) -> dict:
    """What DP-SGD trains: the attention blocks, the normalisation layers' scales and
    shifts, or the whole UNet (each with the attribute tokens), federated over all sites at
    epsilon 1 and 10 and without noise, each at a learning rate scaled to its size
    (`subset_learning_rates`). share: the part of each subset's non-private gain its DP
    finetune keeps."""
    started, context = time.perf_counter(), StudyContext(setup)
    everyone, rates = tuple(context.names), subset_learning_rates(context)
    runs = []
    for seed in setup.seeds:
        rows = []
        for subset in TRAINABLE:
            weights, rate = rates[subset]
            own = None if subset == setup.config.privacy.trainable else rate
            results = {
                eps: context.run(Arm(everyone, eps, trainable=subset, learning_rate=own), seed)
                for eps in TRAINABLE_LEVELS
            }
            public = mean_loss(results[None]["loss"][0])
            final = {eps: _final(r)["mean"] for eps, r in results.items()}
            rows.append(
                {
                    "trainable": subset,
                    "weights": weights,
                    "learning_rate": rate,
                    "public": public,
                    "loss": {_level(eps): value for eps, value in final.items()},
                    "share": {
                        _level(eps): _share(public, final[eps], final[None])
                        for eps in TRAINABLE_LEVELS
                        if eps is not None
                    },
                    "seconds": {_level(eps): r["seconds"] for eps, r in results.items()},
                }
            )
        runs.append({"seed": seed, "rows": rows})
    return summary("trainable", setup, started, runs=runs)


def controllability(setup: StudySetup) -> dict:
    """How well samples follow the requested LV and RV cavity volumes as epsilon falls:
    one volume sampled for each held-out subject's attributes (every site, ED and ES),
    measured by the checkpoint's volume meter (trained on public label maps), Pearson r
    and MAE (mL) against the request. The meter on the real held-out volumes gives its own
    error, the floor. The paper reports controllability degrading under DP."""
    from fedsynth.common.anatomy import VolumeMeter, meter_path
    from fedsynth.common.checkpoint import load_torch

    started, context = time.perf_counter(), StudyContext(setup)
    everyone = tuple(context.names)
    meter = VolumeMeter.from_state(load_torch(meter_path(context.pretrained.folder)))
    real = context.site_domain.controllability(None, meter)
    public = context.site_domain.controllability(context.public, meter)
    runs = []
    for seed in setup.seeds:
        rows = []
        for epsilon in PRIVACY_LEVELS:
            result = context.run(Arm(everyone, epsilon), seed, keep_weights=True)
            measured = context.site_domain.controllability(result["weights"], meter)
            rows.append({"epsilon": epsilon, **measured, "loss": _final(result)["mean"]})
        runs.append({"seed": seed, "rows": rows})
    return summary("controllability", setup, started, real=real, public=public, runs=runs)


def scale(setup: StudySetup) -> dict:
    """Utility against site size (all sites, a sixth, a third and all of their subjects)
    and against the number of sites (the first 1..K, every subject), at the config's
    epsilon: with a fixed epsilon each site's noise falls as its subjects grow, and more
    sites average their noise down."""
    started, context = time.perf_counter(), StudyContext(setup)
    epsilon, names, full = setup.config.privacy.target_epsilon, context.names, setup.subjects
    sizes = sorted({max(2, full // 6), max(2, full // 3), full})
    arms = [
        ("size", n, len(names), Arm(tuple(names), epsilon, subjects=None if n == full else n))
        for n in sizes
    ]  # every subject: the federated arm the other studies run (and cache) too
    arms += [("sites", full, k, Arm(tuple(names[:k]), epsilon)) for k in range(1, len(names))]
    runs = []
    for seed in setup.seeds:
        rows = []
        for axis, subjects, sites, arm in arms:
            result = context.run(arm, seed)
            rows.append(
                {
                    "axis": axis,
                    "subjects_per_site": subjects,
                    "sites": sites,
                    "noise": result["noise"],
                    "public": mean_loss(result["loss"][0]),
                    "loss": _final(result)["mean"],
                    "seconds": result["seconds"],
                }
            )
        runs.append({"seed": seed, "rows": rows})
    return summary("scale", setup, started, epsilon=epsilon, runs=runs)


def _level(epsilon: float | None) -> str:
    return "none" if epsilon is None else f"{epsilon:g}"


STUDIES: dict[str, Callable[[StudySetup], dict]] = {
    "dp-gap": dp_gap,
    "federation": federation,
    "pretraining": pretraining,
    "trainable": trainable,
    "controllability": controllability,
    "scale": scale,
    "downstream": downstream,
    "levers": levers,
    "dp-audit": dp_audit,
    "signal": signal,
}
