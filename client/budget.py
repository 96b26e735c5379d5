"""A site's privacy budget: it plans its own noise and refuses rounds past its maximum.

The site, not the server, decides: from its public subject count (client/public_size.py:
the size its Poisson rate is planned from and its FedAvg weight) and the study's target
(capped by the maximum epsilon in its node config) it picks the noise multiplier that
lands the study's remaining rounds on the target, given what its ledger says it has spent
already. Spend is always read back from the ledger in the site's state dir, so a restarted
site continues from its true spend, never from zero. An exhausted site refuses from the
ledger alone, before it reads any data; a site with too little left for another round
refuses once it knows its subject count (its sample rate depends on it), before it trains
or records anything. The rate planned is the rate the site trains with (dp_trainer's
Poisson sampler runs at `RoundPlan.sample_rate`), so the ledger's epsilon is exact.
"""

from __future__ import annotations

from dataclasses import asdict, astuple, dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedsynth.client.public_size import SubjectCount
from fedsynth.common.accountant import (
    MAX_SIGMA,
    Segment,
    check_delta,
    epsilon,
    plan_noise,
)
from fedsynth.common.config import Config, PrivacyConfig
from fedsynth.common.errors import FedsynthError
from fedsynth.common.io import private_dir
from fedsynth.common.ledger import append_entry, read_ledger, segment_of, spending
from fedsynth.common.spend_signature import key_path, load_or_create_key, public_key_hex, sign

LEDGER = "ledger.jsonl"


class BudgetRefusal(FedsynthError):
    """This round would take the site past its maximum epsilon."""


@dataclass(frozen=True)
class RoundPlan:
    """What one round at this site costs, and the site's total epsilon after it."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    epsilon: float
    subjects: int  # the public size m: the FedAvg weight, never the real count


def sample_rate(privacy: PrivacyConfig, subjects: int) -> float:
    """Poisson rate of subjects: given directly, or the expected batch size over `subjects`
    (at most 1). A site passes its public size m <= n: any rate is exact for the accountant,
    and batch / m keeps the expected batch q n at least the study's batch."""
    if privacy.sample_rate is not None:
        return privacy.sample_rate
    assert privacy.batch_size is not None  # the config sets exactly one of the two
    return min(1.0, privacy.batch_size / subjects)


@dataclass
class SiteBudget:
    """The ledger in `state_dir` and the site's own ceiling `max_epsilon`."""

    site: str
    state_dir: Path
    max_epsilon: float

    @property
    def ledger_path(self) -> Path:
        return Path(self.state_dir) / LEDGER

    def _spending(self, study: str | None) -> list[dict]:
        """Every spending line of the ledger in this state dir (in study `study` only, when
        given), whatever site name it was written under: a renamed site (or data folder)
        keeps its subjects' spend."""
        entries = spending(read_ledger(self.ledger_path))
        return [e for e in entries if study is None or e.get("study") == study]

    def spent(self, study: str | None = None) -> list[Segment]:
        return [segment_of(e) for e in self._spending(study)]

    def history(self, study: str | None = None) -> list[list[float]]:
        """[round, noise_multiplier, sample_rate, steps] of every round this site trained
        (in study `study` only, when given), oldest first: the server charges any its own
        ledger lacks. Spend in other studies counts toward the site's own maximum but
        belongs to those studies' ledgers."""
        return [[int(e["round"]), *astuple(segment_of(e))] for e in self._spending(study)]

    def spent_epsilon(self, privacy: PrivacyConfig, study: str | None = None) -> float:
        """The site's epsilon over its whole ledger, or over study `study` alone (what that
        study's server ledger should say)."""
        return epsilon(self.spent(study), privacy.delta, privacy.accountant)

    def refuse_if_exhausted(self, privacy: PrivacyConfig) -> None:
        """Refuse from the ledger alone: no data is read before this check."""
        self._refuse_if_spent(self.spent(), privacy)

    def _refuse_if_spent(self, spent: list[Segment], privacy: PrivacyConfig) -> None:
        target = min(privacy.target_epsilon, self.max_epsilon)
        so_far = epsilon(spent, privacy.delta, privacy.accountant)
        if so_far >= target:
            raise BudgetRefusal(
                f"site {self.site} has spent epsilon {so_far:.4g} of its {target:.4g} "
                f"(ledger {self.ledger_path}): no further rounds"
            )

    def plan_round(self, config: Config, count: SubjectCount, round_number: int) -> RoundPlan:
        """Noise for this round so that the study's remaining rounds land on the target,
        at the rate planned from the public size `count.public` (delta is checked against
        `count.bound` >= the real count: the top of its rounding bucket by default, so a
        refusal tells only what the default publishes; n itself with a declared size,
        whose max-delta is below 1/n: public_size.check_declared_size).

        The ceiling is the study's target capped by the site's maximum. Raises
        BudgetRefusal when the ledger already reaches it, or when too little is left for
        the remaining rounds even at the largest noise multiplier the planner tries
        (accountant.MAX_SIGMA): a round would cross it. A planned round never crosses it:
        the planner lands the remaining rounds, this one first, at or below the ceiling.
        """
        privacy = config.privacy
        spent = self.spent()
        self._refuse_if_spent(spent, privacy)
        check_delta(privacy.delta, count.bound)
        rate = sample_rate(privacy, count.public)
        remaining = max(1, config.federation.rounds - round_number + 1)
        ceiling = min(privacy.target_epsilon, self.max_epsilon)
        least = Segment(MAX_SIGMA, rate, remaining * privacy.local_steps)
        least_after = epsilon([*spent, least], privacy.delta, privacy.accountant)
        if least_after > ceiling:
            raise BudgetRefusal(
                f"site {self.site}: round {round_number} would cross its epsilon {ceiling:.4g} "
                f"even at noise multiplier {MAX_SIGMA:g} ({least_after:.4g}): no further rounds"
            )
        sigma = plan_noise(
            ceiling,
            privacy.delta,
            rate,
            remaining * privacy.local_steps,
            privacy.accountant,
            spent=spent,
        )
        this_round = Segment(sigma, rate, privacy.local_steps)
        after = epsilon([*spent, this_round], privacy.delta, privacy.accountant)
        return RoundPlan(sigma, rate, privacy.local_steps, privacy.delta, after, count.public)

    def signed(self, study: str | None = None) -> dict:
        """The site's public signing key and, per row of `history(study)`, the row's
        [signature, previous] (common/spend_signature.py; "" for a line written unsigned).
        Makes the key on a site's first READY: the server holds a name to the key it
        first saw, before the site has spent anything."""
        rows = [[e.get("signature", ""), e.get("previous", "")] for e in self._spending(study)]
        return {"key": public_key_hex(self._key()), "rows": rows}

    def _key(self) -> Ed25519PrivateKey:
        private_dir(self.state_dir)
        return load_or_create_key(key_path(self.state_dir))

    def record(
        self, round_number: int, plan: RoundPlan, status: str = "trained", **extra: object
    ) -> None:
        """Append this round to the ledger (fsync'd) before any update leaves the site; a
        spending line is signed with the site's key, chained to its previous one in the
        same study (common/spend_signature.py).

        `extra`: facts the line also carries (the study's id and accountant)."""
        entry = {
            "round": round_number,
            "site": self.site,
            "status": status,
            **asdict(plan),
            **extra,
        }
        if status != "refused" and plan.steps > 0:
            study = str(extra.get("study", ""))
            before = self._spending(study)
            entry["previous"] = before[-1].get("signature", "") if before else ""
            key = self._key()
            fields = {**entry, "study": study, "accountant": entry.get("accountant", "")}
            entry["signature"] = sign(key, fields)
            entry["signing_key"] = public_key_hex(key)
        append_entry(self.ledger_path, entry)
