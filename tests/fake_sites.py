"""Sites that behave like real ones except for DP-SGD itself, for the server's round tests.

A FakeSite keeps a real site ledger (client/budget.SiteBudget in its own state dir),
answers READY from it, re-plans its noise every round from its subject count and spend
exactly as a real site does (sigma changes from round to round, and more after a round
it sat out), records the round before it replies, and answers a fixed delta: the
aggregates can be checked exactly and the accounting is the real one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp

from fedsynth.client.budget import BudgetRefusal, SiteBudget
from fedsynth.client.client_app import secure_aggregation_when_asked, site_guard
from fedsynth.client.public_size import SubjectCount
from fedsynth.common.config import Config, config_from_dict
from fedsynth.common.protocol import READY_RECORD, SiteStop


def disclosed(subjects: int) -> SubjectCount:
    """The count of a site that publishes its exact count (disclose-subject-count)."""
    return SubjectCount(subjects, subjects, subjects, exact=True)


class FakeSite(NumPyClient):
    """One site: `subjects` subjects (published as they are), a fixed delta per weight, a
    real ledger."""

    def __init__(
        self,
        node: int,
        subjects: int,
        shapes: dict[str, tuple[int, ...]],
        state_dir: Path,
        name: str | None = None,
    ) -> None:
        self.node, self.subjects, self.name = node, subjects, name or f"site-{node}"
        rng = np.random.default_rng(node)
        self.delta = [rng.normal(0, 0.01, s) for s in shapes.values()]
        self.budget = SiteBudget(self.name, state_dir, max_epsilon=float("inf"))
        self.metrics_override: dict = {}  # a test can make the reply malformed
        self.fail_after_spend = False

    def history(self, study: str) -> str:
        return json.dumps(self.budget.history(study))

    def spent(self, config: Config) -> float:
        return float(self.budget.spent_epsilon(config.privacy))

    def ready(self, config: Config, study: str) -> dict:
        spent = self.spent(config)
        code = "budget-spent" if spent >= config.privacy.target_epsilon else "ready"
        history = self.history(study)
        return {
            "site": self.name,
            "ready": int(code == "ready"),
            "code": code,
            "history": history,
            "signed": json.dumps(self.budget.signed(study)),
            "epsilon": self.budget.spent_epsilon(config.privacy, study),
        }

    def fit(self, parameters, config):
        study = config_from_dict(json.loads(str(config["study"])))
        round_number = int(config["round"])
        try:
            plan = self.budget.plan_round(study, disclosed(self.subjects), round_number)
        except BudgetRefusal:
            raise SiteStop("budget-spent") from None
        self.budget.record(
            round_number,
            plan,
            study=str(config["study-id"]),
            accountant=study.privacy.accountant,
        )
        if self.fail_after_spend:
            (self.budget.ledger_path.parent / "failed.json").write_text("{}")
            raise SiteStop("update")
        metrics = {
            "site": self.name,
            "noise_multiplier": plan.noise_multiplier,
            "sample_rate": plan.sample_rate,
            "steps": plan.steps,
            "subjects": self.subjects,
            "delta": plan.delta,
            "accountant": study.privacy.accountant,
            "history": self.history(str(config["study-id"])),
            "signed": json.dumps(self.budget.signed(str(config["study-id"]))),
            "epsilon": self.budget.spent_epsilon(study.privacy, str(config["study-id"])),
        }
        metrics.update(self.metrics_override)
        # in the global tensors' dtypes, as a real site sends trained - global
        arrays = [d.astype(p.dtype) for d, p in zip(self.delta, parameters, strict=True)]
        return arrays, self.subjects, metrics


def site_app(sites: dict[int, FakeSite]) -> ClientApp:
    """A ClientApp over the fakes with the real guard and SecAgg+ mods, and a READY mod
    that answers from each fake's own ledger (as client_app.answer_ready does)."""

    def ready(msg: Message, ctxt: Context, call_next):
        if msg.metadata.message_type == MessageType.QUERY:
            site, sent = sites[ctxt.node_id], msg.content.config_records[READY_RECORD]
            answer = site.ready(_study(msg), str(sent["study-id"]))
            if (site.budget.ledger_path.parent / "failed.json").is_file():
                answer.update(ready=0, code="failed-before")
            return Message(RecordDict({READY_RECORD: ConfigRecord(answer)}), reply_to=msg)
        return call_next(msg, ctxt)

    return ClientApp(
        client_fn=lambda ctx: sites[ctx.node_id].to_client(),
        mods=[site_guard, ready, secure_aggregation_when_asked],
    )


def _study(msg: Message) -> Config:
    return config_from_dict(json.loads(str(msg.content.config_records[READY_RECORD]["study"])))


def fake_weights(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(s) for k, s in shapes.items()}
