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
    " Secure aggregation (Flower SecAgg+) kept each site's update from the coordinator in "
    "{rounds}, assuming an honest-but-curious server; it does not hold against the "
    "reconstruction threshold or more parties colluding, and with 2 sites in a round each "
    "site learns the other's update from the next model."
)
PLAIN_TRUST = (
    " Secure aggregation was off in {rounds}: the coordinator saw each site's noised update "
    "there (the DP guarantee above still holds for it)."
)
ESTIMATES_MEANING = (
    "A no-reply estimate is charged for a round a site was sent and whose reply never "
    "came: the server cannot know what the site spent, so it charges the most it could "
    "have, the site's epsilon taken to the study's target (a site never spends past the "
    "target, it refuses first). The site's true spend is at most that. An estimate is "
    "replaced by the site's own ledger line when the site reports it; those counted here "
    "never were, so these sites' epsilons are upper bounds."
)
REFERENCE_NOT_COVERED = (
    "the quality numbers measured against the --reference data: computed without DP from "
    "it, so the coordinator must give only data whose statistics it may publish"
)
IN_CLEAR = [
    "each site's name and its public subject count (its update's weight in the sites' "
    "mean): a size the site "
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
    "public size: the site's sample rates and its weight in the sites' mean give a size at "
    "most its real subject count (by default rounded down, or declared); exact only if the "
    "site opted in with disclose-subject-count, which the site does not report to the "
    "coordinator"
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
    "a patient treated at several sites: each site protects its own records of that "
    "person, so that person's total is up to the sum of those sites' epsilons (and of "
    "their deltas)",
    "a malicious coordinator: one that changes the code the sites run, or sends sites "
    "models crafted to expose their updates; the sites' own checks (signed apps, study "
    "terms, budgets) limit, but do not rule out, this",
    "side channels: which sites replied and when, round wall times, and anything outside "
    "the model's weights",
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


def _rounds_text(numbers: list[int]) -> str:
    """'round 3', 'rounds 1-4, 6': runs of consecutive rounds."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    text = ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
    return f"round{'s' if len(numbers) > 1 else ''} {text}"


def _secure_aggregation(study: FinishedStudy) -> dict:
    """Per round, from each round checkpoint's metadata: a round that ran under SecAgg+
    records its parameters there (`secagg`, server/strategy.py), also when it was halted
    and not aggregated; a round that ran plain records none. A round with no record is
    not claimed, so a study resumed under another setting is stated round by round."""
    rounds, plain = {}, []
    for number in range(1, study.rounds_done + 1):
        secagg = study.round_metadata(number).get("secagg")
        if isinstance(secagg, dict) and secagg:
            rounds[str(number)] = secagg
        else:
            plain.append(number)
    stated: dict = {"enabled": not plain, "rounds": rounds, "plain_rounds": plain}
    if rounds:
        stated |= {
            "protocol": f"Flower SecAgg+ (flwr {version('flwr')})",
            "note": "per round that ran under it: sites, reconstruction_threshold (never "
            "below min_sites), clipping_range (|delta| bound), quantization_range, "
            "num_shares (Flower's fraction of the sampled sites that hold shares of each "
            "site's secrets: 1.0 = all), max_weight; plain_rounds ran without it",
        }
    return {**stated, "min_sites": study.summary.get("min_sites")}


def _trust_model(secagg: dict) -> str:
    """DP's trust model, then SecAgg+'s claimed only for the rounds it covered."""
    secure = sorted(int(n) for n in secagg["rounds"])
    plain = secagg["plain_rounds"]
    text = DP_TRUST
    if secure:
        text += SECAGG_TRUST.format(rounds=_rounds_text(secure) if plain else "every round")
    if plain:
        text += PLAIN_TRUST.format(rounds=_rounds_text(plain) if secure else "every round")
    return text


SIGNATURES = (
    "every counted line that is not a no-reply estimate carries its site's Ed25519 "
    "signature (site_signature, chained by site_previous) of study, site, round, "
    "noise_multiplier, sample_rate, steps, delta and accountant, under the key site_keys "
    "names for the site: a site checks that key is the public half of its own "
    "(spend-signing-key.pem in its state dir); estimates are the server's and only add spend"
)


def _site_keys(study: FinishedStudy) -> dict[str, str]:
    """Site -> the public key its counted, signed lines carry (one per site)."""
    keys: dict[str, str] = {}
    for site in sorted(study.site_epsilon):
        for e in charged(study.ledger, site):
            if isinstance(e.get("site_key"), str):
                keys.setdefault(site, e["site_key"])
    return keys


def privacy_statement(
    study: FinishedStudy, cohort_size: int, with_reference: bool, cohort_sha256: str | None = None
) -> dict:
    """The statement as a JSON-able dict (written as privacy.json by the release, with the
    fingerprint of the cohort written, `cohort_sha256`: a site's audit checks it)."""
    privacy, federation = study.config.privacy, study.config.federation
    if not privacy.enabled:
        raise FedsynthError(
            f"{study.run_dir}: privacy.enabled is false, the study carries no DP guarantee; "
            "fedsynth releases only differentially private studies"
        )
    sites = {site: _site_entry(study, site) for site in sorted(study.site_epsilon)}
    secagg = _secure_aggregation(study)
    estimates = sum(entry["no_reply_estimates"] for entry in sites.values())
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
        "secure_aggregation": secagg,
        "trust_model": _trust_model(secagg),
        "no_reply_estimates": {
            "count": estimates,
            "sites": sorted(s for s, entry in sites.items() if entry["no_reply_estimates"]),
            "meaning": ESTIMATES_MEANING,
        },
        "in_clear": IN_CLEAR,
        "not_covered": NOT_COVERED + ([REFERENCE_NOT_COVERED] if with_reference else []),
        "study_id": study.terms.get("study_id"),
        "site_keys": _site_keys(study),
        "signatures": SIGNATURES,
        "fedsynth": version("fedsynth"),
        "cohort_volumes": cohort_size,
        "cohort_sha256": cohort_sha256,
        "ledger": LEDGER_COPY,
        "recompute": (
            f"for each site, the lines of {LEDGER_COPY} with its name whose status is not "
            "'refused' and whose steps > 0, less every line whose 'estimate' id appears as "
            "another line's 'replaces_estimate'; their (noise_multiplier, sample_rate, steps) "
            f"are Opacus' accountant history ({privacy.accountant}); epsilon at delta "
            f"{privacy.delta:g}. `fedsynth privacy verify --release DIR` does this."
        ),
    }
