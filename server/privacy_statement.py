"""privacy.json: what a released cohort's differential privacy guarantee is, and is not.

Every number comes from the study's checked run dir (server/finished_study.py); every
epsilon is recomputable from the ledger copied beside the statement, with plain Opacus:
for each site take the ledger lines that count (common/ledger.py `charged`), feed their
(noise multiplier, sample rate, steps) to the accountant as its history, and ask for
epsilon at the study's delta. `fedsynth privacy verify` (common/privacy_verify.py) does
exactly that.
"""

from __future__ import annotations

from importlib.metadata import version

from fedsynth.common.errors import FedsynthError
from fedsynth.common.ledger import charged
from fedsynth.common.privacy_verify import LEDGER_COPY
from fedsynth.server.finished_study import FinishedStudy

DP_TRUST = (
    "Each site trains with DP-SGD on its own subjects: Poisson sampling of subjects, each "
    "subject's gradient clipped, Gaussian noise added at the site, so the guarantee holds "
    "against anyone who sees the model or the cohort, the coordinator included."
)
SECAGG_TRUST = (
    " Secure aggregation (Flower SecAgg+) kept each site's update from the coordinator, "
    "assuming an honest-but-curious server; it does not hold against the reconstruction "
    "threshold or more parties colluding, and with 2 sites in a round each site learns the "
    "other's update from the next model."
)
PLAIN_TRUST = (
    " Secure aggregation was off: the coordinator saw each site's noised update (the DP "
    "guarantee above still holds for it)."
)
REFERENCE_NOT_COVERED = (
    "the quality numbers measured against the --reference data: computed without DP from "
    "it, so the coordinator must give only data whose statistics it may publish"
)
IN_CLEAR = [
    "each site's name and its public subject count (the FedAvg weight): a size the site "
    "publishes, at most its real count: by default the count rounded down to two "
    "significant figures and a multiple of 10 (1 below 10 subjects), a size the site "
    "declared (node config public-subjects), or the exact count for a site that opted in "
    "(disclose-subject-count)",
    "each round's noise multiplier, sample rate and steps per site, and each site's own "
    "ledger of them (the accounting needs them): a site's sample rate is the study's, or "
    "its expected batch over that public count, so it reveals that count and no more",
    "a fixed reason code when a site does not train",
]
SUBJECT_COUNT = (
    "public size: the site's sample rates and FedAvg weight give a size at most its real "
    "subject count (by default rounded down, or declared); exact only if the site opted in "
    "with disclose-subject-count, which the site does not report to the coordinator"
)
NOT_COVERED = [
    "the public pretraining data, the autoencoder and the anatomy and feature networks "
    "(trained on public data only; public data carries no DP claim)",
    "the choice of hyperparameters (noise, clip, learning rate, steps, trainable "
    "subset): if anyone tuned them by looking at site data, that look is not accounted",
    "memorisation audits run at sites (fedsynth audit): they look at private data without "
    "DP, and their numbers are shared at each site's discretion",
    "fedsynth site-check and any other look at a site's data outside DP-SGD",
    "attributes requested for the synthetic cohort (chosen by the coordinator, or drawn "
    "from the public attribute table)",
]


def _site_entry(study: FinishedStudy, site: str) -> dict:
    lines = charged(study.ledger, site)
    return {
        "epsilon": study.site_epsilon[site],
        "delta": study.config.privacy.delta,
        "rounds": sorted({int(e["round"]) for e in lines}),
        "noise_multipliers": [float(e["noise_multiplier"]) for e in lines],
        "sample_rates": [float(e["sample_rate"]) for e in lines],
        "steps": [int(e["steps"]) for e in lines],
        "total_steps": sum(int(e["steps"]) for e in lines),
        "no_reply_estimates": sum(1 for e in lines if e.get("estimate")),
        "subject_count": SUBJECT_COUNT,
    }


def _secure_aggregation(study: FinishedStudy) -> dict:
    if not study.summary.get("secure_aggregation"):
        return {"enabled": False}
    rounds = {}
    for number in range(1, study.rounds_done + 1):
        secagg = study.round_metadata(number).get("secagg")
        if secagg:
            rounds[str(number)] = secagg
    return {
        "enabled": True,
        "protocol": f"Flower SecAgg+ (flwr {version('flwr')})",
        "rounds": rounds,
        "note": "per round: sites, reconstruction_threshold (never below min_sites), "
        "clipping_range (|delta| bound), quantization_range, num_shares, max_weight",
        "min_sites": study.summary.get("min_sites"),
    }


def privacy_statement(study: FinishedStudy, cohort_size: int, with_reference: bool) -> dict:
    """The statement as a JSON-able dict (written as privacy.json by the release)."""
    privacy, federation = study.config.privacy, study.config.federation
    if not privacy.enabled:
        raise FedsynthError(
            f"{study.run_dir}: privacy.enabled is false, the study carries no DP guarantee; "
            "fedsynth releases only differentially private studies"
        )
    sites = {site: _site_entry(study, site) for site in sorted(study.site_epsilon)}
    secure = bool(study.summary.get("secure_aggregation"))
    accountant_version = f"opacus {version('opacus')}"
    return {
        "privacy_unit": "subject (a person: all of their volumes and attributes) at one site",
        "guarantee": (
            f"({max(study.site_epsilon.values()):.4g}, {privacy.delta:g})-differential "
            "privacy per subject at each site, for the model and anything sampled from it; "
            "a subject lives at one site, so the study's epsilon is the largest site's"
        ),
        "study_epsilon": max(study.site_epsilon.values()),
        "target_epsilon": privacy.target_epsilon,
        "delta": privacy.delta,
        "accountant": privacy.accountant,
        "accountant_library": accountant_version,
        "sites": sites,
        "clip": privacy.max_grad_norm,
        "expected_batch_subjects": privacy.batch_size,
        "trainable": privacy.trainable,
        "rounds_done": study.rounds_done,
        "rounds_planned": federation.rounds,
        "ended_early": study.summary.get("ended_early"),
        "secure_aggregation": _secure_aggregation(study),
        "trust_model": DP_TRUST + (SECAGG_TRUST if secure else PLAIN_TRUST),
        "in_clear": IN_CLEAR,
        "not_covered": NOT_COVERED + ([REFERENCE_NOT_COVERED] if with_reference else []),
        "study_id": study.terms.get("study_id"),
        "fedsynth": version("fedsynth"),
        "cohort_volumes": cohort_size,
        "ledger": LEDGER_COPY,
        "recompute": (
            f"for each site, the lines of {LEDGER_COPY} with its name whose status is not "
            "'refused' and whose steps > 0, less every line whose 'estimate' id appears as "
            "another line's 'replaces_estimate'; their (noise_multiplier, sample_rate, steps) "
            f"are Opacus' accountant history ({privacy.accountant}); epsilon at delta "
            f"{privacy.delta:g}. `fedsynth privacy verify --release DIR` does this."
        ),
    }
