"""The coordinator of a `flwr run` study: prepare, then rounds of FedAvg with a ledger.

Preparation (all paths absolute: the ServerApp runs wherever the SuperLink started):
the config (run config `config`, a preset or YAML path, plus any other run config keys
as dotted overrides), the run dir (run config `run-dir`, else `paths.run-dir`, else a new
folder under the cache dir), phantom sites (cached), and the public checkpoint (pretrained
once per config and cached).

Each round (Flower's legacy DefaultWorkflow with one strategy, StudyStrategy): send the
global UNet and the study config to the sites, read back weight DELTAS and
(noise_multiplier, sample_rate, steps), append one server ledger line per site with
epsilon recomputed from that site's whole history (write-ahead), and only then save the
round's checkpoint (a full checkpoint folder, published by an atomic state.json).

federation.secure-aggregation true (the default) runs the fit step as Flower SecAgg+
(SecAggPlusWorkflow; the sites' ClientApp has secaggplus_mod): the server only ever
unmasks the subject-weighted mean delta, never one site's. num_examples (subjects) and
the spend metrics travel in clear, so the ledger is the same on both paths.
SecAgg+ parameters (secagg_settings):
- clipping_range 4.0 (run config `secagg-clipping-range`): sites send deltas, which are
  small (AdamW moves a weight about lr per step); a site whose max |delta| exceeds it
  fails loudly rather than be clipped.
- quantization_range 2**(32 - bit_length(sites)): as large as the 2**32 modulus allows
  with no wrap-around of the sum (2**30 for 3 sites): step 2*clip/range ~ 7e-9.
- max_weight: the largest subject count a site may have (run config `secagg-max-weight`,
  default `phantom-subjects`): weights are subjects / max_weight, so a tight bound keeps
  precision; a site with more subjects fails loudly.
- num_shares: all sampled sites; reconstruction threshold: a majority (2 of 3).
A refused site (budget spent) still takes part with a zero delta and num_examples 0:
weight 0 adds nothing to the sum, and the protocol keeps its full set of share holders.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context
from flwr.common import (
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import ClientManager, LegacyContext, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key
from flwr.server.workflow.default_workflows import default_fit_workflow
from flwr.serverapp import Grid, ServerApp

from fedsynth.common.accountant import Segment, epsilon
from fedsynth.common.checkpoint import (
    AUTOENCODER,
    METADATA,
    UNET,
    file_sha256,
    load_pretrained,
    load_torch,
    read_metadata,
    save_torch,
    write_metadata,
)
from fedsynth.common.config import Config, load_config, pretraining_hash, to_dict
from fedsynth.common.errors import FedsynthError
from fedsynth.common.io import atomic_path, atomic_write_text
from fedsynth.common.ledger import (
    append_entry,
    read_ledger,
    segment_of,
    spending,
    spent_segments,
)

LEDGER = "ledger.jsonl"
SUMMARY = "summary.json"
STATE = "state.json"
RESERVED = (
    "config", "run-dir", "resume", "checkpoint", "validation-data", "phantom-subjects",
    "secagg-clipping-range", "secagg-max-weight",
)  # fmt: skip
VALIDATION_SUBJECTS = 4  # public held-out phantom subjects (8 volumes) for validation
CLIPPING_RANGE = 4.0  # |delta| bound under SecAgg+; a site with a larger delta fails
NODE_WAIT_S = 120.0

app = ServerApp()


@dataclass(frozen=True)
class Study:
    config: Config
    run_dir: Path
    phantoms: Path | None  # simulated sites' data; None when real sites join
    checkpoint: Path
    resume: bool
    clipping_range: float = CLIPPING_RANGE
    max_weight: float = 1000.0  # SecAgg+: the largest subject count any site may weigh
    validation: Path | None = None  # public held-out data for per-round validation


def _cache_dir(config: Config) -> Path:
    if config.paths.cache_dir:
        return Path(config.paths.cache_dir).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser().resolve() / "fedsynth"


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


def config_overrides(run_config: dict[str, Any]) -> dict[str, Any]:
    """The config keys this run overrides: declared keys whose value is not "" (unset)."""
    return {k: v for k, v in run_config.items() if k not in RESERVED and v != ""}


def _folder(run_config: dict[str, Any], key: str) -> Path | None:
    text = str(run_config.get(key, "") or "")
    if not text:
        return None
    folder = Path(text).expanduser().resolve()
    if not folder.is_dir():
        raise FedsynthError(f"run config {key}={text!r}: no such folder")
    return folder


def _phantoms(cache: Path, config: Config, subjects: int, held_out: bool = False) -> Path:
    """Phantom sites and public set (or a public held-out set), generated once and cached."""
    sites, seed = config.federation.sites, config.seed
    if held_out:  # another seed: public-profile subjects the checkpoint never saw
        sites, seed, folder = 1, seed + 1, cache / "phantoms" / f"held-out-seed{seed}"
    else:
        folder = cache / "phantoms" / f"sites{sites}-subjects{subjects}-seed{seed}"
    if not (folder / f"site-{sites}" / "manifest.csv").is_file():
        from fedsynth.simulations.phantoms import generate_cohorts

        print(f"[fedsynth] generating phantoms in {folder}", flush=True)
        count = 1 if held_out else subjects
        public = VALIDATION_SUBJECTS if held_out else None
        generate_cohorts(folder, sites, count, seed, public_subjects=public, progress=False)
    return folder


def prepare(run_config: dict[str, Any], run_id: int | str = "") -> Study:
    """Config, run dir, data and public checkpoint, generated/pretrained when missing.

    With run config `checkpoint` (a public checkpoint folder) real sites are expected and
    nothing is generated; `validation-data` names public held-out data for validation.
    Without them the study is a simulation on phantoms cached under the cache dir.
    """
    config = load_config(
        str(run_config.get("config", "default") or "default"), config_overrides(run_config)
    )
    cache = _cache_dir(config)
    run_dir_text = str(run_config.get("run-dir", "") or config.paths.run_dir)
    if run_dir_text:
        run_dir = Path(run_dir_text).expanduser().resolve()
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = cache / "runs" / f"{stamp}-{run_id}"
    resume = _as_bool(run_config.get("resume", False))
    if not resume and (run_dir / LEDGER).exists():
        raise FedsynthError(
            f"{run_dir} already holds a study (ledger.jsonl): pass -c 'resume=true' to "
            "continue it, or choose a new run-dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)

    subjects = int(run_config.get("phantom-subjects", 20))
    checkpoint = _folder(run_config, "checkpoint")
    validation = _folder(run_config, "validation-data")
    phantoms = None
    if checkpoint is None:
        phantoms = _phantoms(cache, config, subjects)
        data_hash = file_sha256(phantoms / "public" / "manifest.csv")
        checkpoint = cache / "pretrained" / f"{pretraining_hash(config)}-{data_hash[:12]}"
        if not (checkpoint / METADATA).is_file():  # written last: the checkpoint is whole
            from fedsynth.server.pretrain import pretrain

            print(f"[fedsynth] pretraining on public phantoms into {checkpoint}", flush=True)
            pretrain(config, phantoms / "public", checkpoint, show_progress=True)
        if validation is None:
            validation = _phantoms(cache, config, subjects, held_out=True) / "public"
    clipping = float(run_config.get("secagg-clipping-range", 0) or CLIPPING_RANGE)
    max_weight = float(run_config.get("secagg-max-weight", 0) or subjects)
    return Study(config, run_dir, phantoms, checkpoint, resume, clipping, max_weight, validation)


def _round_dir(run_dir: Path, round_number: int) -> Path:
    return run_dir / "rounds" / f"round-{round_number:03d}"


def save_round(
    study: Study, round_number: int, weights: dict[str, torch.Tensor], facts: dict
) -> Path:
    """A full checkpoint folder for this round, then state.json pointing to it (atomic)."""
    folder = _round_dir(study.run_dir, round_number)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / AUTOENCODER).is_file():  # atomic: a torn copy must not pass this check
        with atomic_path(folder / AUTOENCODER) as tmp:
            shutil.copyfile(study.checkpoint / AUTOENCODER, tmp)
    save_torch(folder / UNET, weights)
    pretrained_meta = read_metadata(study.checkpoint)
    stats = {k: pretrained_meta[k] for k in ("latent_mean", "latent_std") if k in pretrained_meta}
    write_metadata(folder, study.config, round=round_number, **stats, **facts)
    atomic_write_text(
        study.run_dir / STATE,
        json.dumps({"rounds_done": round_number, "checkpoint": str(folder)}) + "\n",
    )
    return folder


def site_epsilons(ledger: list[dict], config: Config) -> dict[str, float]:
    sites = sorted({e["site"] for e in ledger})
    return {
        s: epsilon(spent_segments(ledger, s), config.privacy.delta, config.privacy.accountant)
        for s in sites
    }


def study_validation_dir(study: Study) -> Path:
    return study.run_dir / "validation"


def _validation_losses(study: Study) -> dict[str, float]:
    losses = {}
    for path in sorted(study_validation_dir(study).glob("round-*.json")):
        entry = json.loads(path.read_text())
        losses[str(entry["round"])] = float(entry["loss"])
    return losses


def write_summary(study: Study, rounds_done: int, ended: str = "") -> dict:
    """summary.json (atomic): per-site and study epsilon recomputed from the ledger."""
    ledger = read_ledger(study.run_dir / LEDGER)
    per_site = site_epsilons(ledger, study.config)
    montage = study_validation_dir(study) / f"round-{rounds_done:03d}.png"
    summary = {
        "rounds_done": rounds_done,
        "rounds_planned": study.config.federation.rounds,
        "ended_early": ended or None,
        "target_epsilon": study.config.privacy.target_epsilon,
        "site_epsilon": per_site,
        "study_epsilon": max(per_site.values(), default=0.0),
        "delta": study.config.privacy.delta,
        "accountant": study.config.privacy.accountant,
        "secure_aggregation": bool(study.config.federation.secure_aggregation),
        "checkpoint": str(_round_dir(study.run_dir, rounds_done)) if rounds_done else None,
        "pretrained": str(study.checkpoint),
        "validation_loss": _validation_losses(study),
        "montage": str(montage) if montage.is_file() else None,
    }
    atomic_write_text(study.run_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary


def ledger_table(summary: dict) -> str:
    """The privacy ledger summary a study ends with, as a few aligned lines."""
    lines = [
        f"privacy ledger ({summary['accountant']}, delta {summary['delta']:g}, target epsilon "
        f"{summary['target_epsilon']:g}, secure aggregation "
        f"{'on' if summary['secure_aggregation'] else 'off'}):"
    ]
    for site, value in summary["site_epsilon"].items():
        lines.append(f"  {site:<16} epsilon {value:.4f}")
    lines.append(f"  {'study (max)':<16} epsilon {summary['study_epsilon']:.4f}")
    lines.append(f"rounds {summary['rounds_done']}/{summary['rounds_planned']}")
    if summary["ended_early"]:
        lines[-1] += f" (ended {summary['ended_early']})"
    if summary["montage"]:
        lines.append(f"samples of the final model: {summary['montage']}")
    return "\n".join(lines)


def _ledger_line(
    study: Study, round_number: int, site: str, segment: Segment | None, status: str, **extra
) -> dict:
    """One server ledger line, epsilon recomputed from the site's history plus this round."""
    privacy = study.config.privacy
    path = study.run_dir / LEDGER
    history = spent_segments(read_ledger(path), site)
    if segment is not None and segment.steps > 0 and status != "refused":
        history.append(segment)
    entry = {
        "round": round_number,
        "site": site,
        "noise_multiplier": segment.noise_multiplier if segment else 0.0,
        "sample_rate": segment.sample_rate if segment else 0.0,
        "steps": segment.steps if segment else 0,
        "delta": privacy.delta,
        "epsilon": epsilon(history, privacy.delta, privacy.accountant),
        "accountant": privacy.accountant,
        "status": status,
        **extra,
    }
    append_entry(path, entry)
    return entry


def reconcile(study: Study, site: str, reported: str) -> int:
    """Charge rounds the site's own ledger holds and the server's does not; return how many.

    A site records a round before its update leaves it, so an update the server never
    received (a reply lost, a server killed before its ledger line) is still in the site's
    history. Matched round by round on the exact numbers; a server line that charged a
    silent site with its last plan stands in for whatever that site reports for the round.
    """
    server: dict[int, list[Segment]] = {}
    for e in spending(read_ledger(study.run_dir / LEDGER), site):
        server.setdefault(int(e["round"]), []).append(segment_of(e))
    missing: list[tuple[int, Segment]] = []
    for r, sigma, rate, steps in json.loads(reported or "[]"):
        segment = Segment(float(sigma), float(rate), int(steps))
        charged = server.get(int(r), [])
        if segment in charged:
            charged.remove(segment)
        else:
            missing.append((int(r), segment))
    added = 0
    for r, segment in missing:
        if server.get(r):  # a last-plan charge for this round covers it
            server[r].pop()
            continue
        _ledger_line(study, r, site, segment, "no-reply", reported_by_site=True)
        added += 1
    return added


def _compare_reported(study: Study, site: str, reported: Any) -> None:
    """Warn when a site's own epsilon differs from the server's recomputation: the ledgers
    diverged (e.g. a site whose replies were lost and never answered again). The server's
    figure, from its own ledger, is the one that counts."""
    if reported is None:
        return
    privacy = study.config.privacy
    ours = epsilon(
        spent_segments(read_ledger(study.run_dir / LEDGER), site), privacy.delta, privacy.accountant
    )
    if not math.isclose(float(reported), ours, rel_tol=1e-6, abs_tol=1e-9):
        print(
            f"[fedsynth] warning: {site} reports epsilon {float(reported):.6g}, the server's "
            f"ledger gives {ours:.6g}; the server's figure counts",
            flush=True,
        )


def site_is_spent(ledger: list[dict], site: str, config: Config) -> bool:
    """The server's view: the site refused last time, or its epsilon reached the target."""
    mine = [e for e in ledger if e["site"] == site]
    if not mine:
        return False
    if mine[-1]["status"] == "refused":
        return True
    privacy = config.privacy
    spent = epsilon(spent_segments(mine), privacy.delta, privacy.accountant)
    return spent >= privacy.target_epsilon


def _resume_point(study: Study) -> tuple[int, dict[str, torch.Tensor] | None]:
    state = study.run_dir / STATE
    if not study.resume or not state.is_file():
        return 0, None
    rounds_done = int(json.loads(state.read_text())["rounds_done"])
    weights = load_torch(_round_dir(study.run_dir, rounds_done) / UNET)
    return rounds_done, weights


def secagg_settings(study: Study) -> dict[str, Any]:
    """SecAgg+ parameters for this study (see the module docstring for the reasoning)."""
    sites = study.config.federation.sites_per_round
    if sites < 2:
        raise FedsynthError(
            "secure aggregation needs at least 2 sites per round: set "
            "federation.sites-per-round >= 2 (3 or more to hide a site from the others) "
            "or federation.secure-aggregation false"
        )
    return {
        "num_shares": 1.0,  # every sampled site holds a share of every other's secrets
        "reconstruction_threshold": max(2, sites // 2 + 1),
        "clipping_range": study.clipping_range,
        # sites x quantization_range must stay below the 2**32 modulus (no wrap-around)
        "quantization_range": 2 ** (32 - sites.bit_length()),
        "max_weight": study.max_weight,
    }


def mean_delta(updates: list[tuple[Parameters, int]]) -> list[np.ndarray]:
    """Subject-weighted mean of the sites' deltas (float64); sites with weight 0 left out."""
    updates = [(p, n) for p, n in updates if n > 0]
    total = sum(n for _, n in updates)
    out: list[np.ndarray] | None = None
    for parameters, n in updates:
        arrays = parameters_to_ndarrays(parameters)
        scaled = [a.astype(np.float64) * (n / total) for a in arrays]
        out = scaled if out is None else [o + s for o, s in zip(out, scaled, strict=True)]
    return out or []


class StudyStrategy(FedAvg):
    """One strategy for both paths: the plain default fit workflow and SecAgg+.

    configure_fit picks the sites that still have budget (from the server's ledger) and
    sends them the global weights (every state-dict tensor, in `keys` order) and the study
    config; when too few are left it ends the study (`over` says why). Sites answer DELTAS
    (trained - global). aggregate_fit writes the ledger lines (epsilon recomputed, missed
    rounds charged from the sites' own histories, no-reply sites charged), only then the
    round checkpoint, then validates on public held-out data. Under SecAgg+ every result's
    parameters are the same unmasked weighted mean (the workflow replaced them);
    num_examples and metrics travel in clear, so the ledger is the same.
    """

    def __init__(self, study: Study, weights: dict[str, torch.Tensor], done: int) -> None:
        super().__init__(
            fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=1,
            min_evaluate_clients=1, min_available_clients=1,
        )  # fmt: skip
        self.study = study
        self.secure = bool(study.config.federation.secure_aggregation)
        self.weights = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
        self.keys = list(self.weights)
        self.done = done
        self.chosen: list[int] = []
        self.settled = 0  # the last workflow round aggregate_fit has written
        self.over = ""  # why the study ended before its planned rounds ("" while it runs)
        self.started = time.monotonic()
        # which site a node is (sites tell us in their replies), and its last plan, for
        # charging a site that was sent an instruction and did not answer
        self.site_of: dict[int, str] = {}
        self.last_segment: dict[str, Segment] = {}
        for e in spending(read_ledger(study.run_dir / LEDGER)):
            self.last_segment[e["site"]] = segment_of(e)
        self.study_text = json.dumps(to_dict(study.config))
        self.validator = None
        if study.validation is not None:
            from fedsynth.server.validation import Validator

            self.validator = Validator(study.checkpoint, study.validation, study.config)

    def _parameters(self) -> Parameters:
        return ndarrays_to_parameters([self.weights[k].numpy() for k in self.keys])

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters:
        return self._parameters()

    def select(self, proxies: list[ClientProxy]) -> list[ClientProxy]:
        """Sites with budget left, those trained least first (they take turns)."""
        ledger = read_ledger(self.study.run_dir / LEDGER)
        config = self.study.config
        usable = [
            p for p in proxies
            if p.node_id not in self.site_of
            or not site_is_spent(ledger, self.site_of[p.node_id], config)
        ]  # fmt: skip
        trained = Counter(e["site"] for e in ledger if e["status"] == "trained")
        usable.sort(key=lambda p: (trained[self.site_of.get(p.node_id, "")], p.node_id))
        return usable[: config.federation.sites_per_round]

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        if self.over:
            return []
        round_number = self.done + server_round
        wanted = self.study.config.federation.sites_per_round
        client_manager.wait_for(wanted, timeout=int(NODE_WAIT_S))
        proxies = sorted(client_manager.all().values(), key=lambda p: p.node_id)
        if not proxies:
            raise FedsynthError(f"no site connected within {NODE_WAIT_S:.0f} s")
        chosen = self.select(proxies)
        need = 2 if self.secure else 1
        if len(chosen) < need:
            self.over = (
                f"before round {round_number}: {len(chosen)} of {len(proxies)} connected sites "
                f"have budget left ({need} needed"
                + (" for secure aggregation)" if self.secure else ")")
            )
            print(f"[fedsynth] study ends {self.over}", flush=True)
            return []
        self.chosen = [p.node_id for p in chosen]
        print(f"[fedsynth] round {round_number}: {len(chosen)} sites", flush=True)
        instruction = FitIns(
            self._parameters(),
            {
                "round": round_number,
                "study": self.study_text,
                "keys": json.dumps(self.keys),
                "checkpoint": str(self.study.checkpoint),
                "phantoms": str(self.study.phantoms or ""),
                "site-states": str(self.study.run_dir / "sites"),
                # 0: plain FedAvg; else the site checks its delta fits SecAgg+'s range
                "clipping-range": self.study.clipping_range if self.secure else 0.0,
                "max-weight": self.study.max_weight if self.secure else 0.0,
            },
        )
        return [(proxy, instruction) for proxy in chosen]

    def _charge(self, round_number: int, results: list[tuple[ClientProxy, FitRes]]) -> tuple:
        """Ledger lines for this round: replies, missed history, and silent sites."""
        study = self.study
        answered: set[int] = set()
        trained: list[tuple[Parameters, int]] = []
        refused = silent = 0
        for proxy, res in results:
            node = proxy.node_id
            answered.add(node)
            m = res.metrics
            site = str(m["site"])
            self.site_of[node] = site
            if int(m["refused"]):
                print(f"[fedsynth] round {round_number}: {site} refused: {m['reason']}")
                _ledger_line(study, round_number, site, None, "refused")
                refused += 1
            else:
                segment = segment_of(m)
                self.last_segment[site] = segment
                _ledger_line(study, round_number, site, segment, "trained")
                trained.append((res.parameters, int(res.num_examples)))
            missed = reconcile(study, site, str(m.get("history", "[]")))
            if missed:
                print(f"[fedsynth] {site}: charged {missed} round(s) from its own ledger")
            _compare_reported(study, site, m.get("epsilon"))
        for node in self.chosen:
            if node not in answered:
                site = self.site_of.get(node, f"node-{node}")
                print(f"[fedsynth] round {round_number}: {site} did not answer", flush=True)
                # charged with its last known plan; a site never heard from is charged
                # from its own history (reconcile) when it next answers
                _ledger_line(study, round_number, site, self.last_segment.get(site), "no-reply")
                silent += 1
        return trained, refused, silent

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        study, round_number = self.study, self.done + server_round
        for failure in failures:
            print(f"[fedsynth] round {round_number}: failure: {failure}", flush=True)
        trained, refused, silent = self._charge(round_number, results)
        if trained:
            # SecAgg+: every result holds the same aggregate, already weighted by subjects
            delta = parameters_to_ndarrays(trained[0][0]) if self.secure else mean_delta(trained)
            for key, value in zip(self.keys, delta, strict=True):
                old = self.weights[key]
                if old.is_floating_point():
                    change = torch.from_numpy(np.asarray(value, np.float64).reshape(old.shape))
                    self.weights[key] = (old.double() + change).to(old.dtype)
        # the ledger lines above are on disk (fsync'd) before the round's model is saved
        save_round(study, round_number, self.weights, {"sites_trained": len(trained)})
        loss = self._validate(round_number)
        summary = write_summary(study, round_number)
        epsilons = ", ".join(f"{k} {v:.3g}" for k, v in summary["site_epsilon"].items())
        print(
            f"[fedsynth] round {round_number}/{study.config.federation.rounds}: "
            f"{len(trained)} trained, {refused} refused, {silent} no reply; "
            + (f"validation loss {loss:.4f}; " if loss is not None else "")
            + f"epsilon {epsilons}; {time.monotonic() - self.started:.0f} s",
            flush=True,
        )
        self.settled = server_round
        return self._parameters(), {}

    def _validate(self, round_number: int) -> float | None:
        """Held-out public loss and montage; kept next to the round's checkpoint."""
        if self.validator is None:
            return None
        folder = study_validation_dir(self.study)
        loss = self.validator(self.weights, folder / f"round-{round_number:03d}.png")
        atomic_write_text(
            folder / f"round-{round_number:03d}.json",
            json.dumps({"round": round_number, "loss": loss}) + "\n",
        )
        return loss


class _SettledFit:
    """A fit workflow, then aggregate_fit with nothing if it halted (SecAgg+ too few sites)
    so that the round still gets its ledger lines (no-reply) and its checkpoint. Once the
    study is over (no site with budget left), the remaining rounds do nothing."""

    def __init__(self, fit: Any, strategy: StudyStrategy) -> None:
        self.fit, self.strategy = fit, strategy

    def __call__(self, grid: Grid, context: LegacyContext) -> None:
        if self.strategy.over:
            return
        self.fit(grid, context)
        server_round = int(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        if self.strategy.settled != server_round and not self.strategy.over:
            print(f"[fedsynth] round {self.strategy.done + server_round}: aggregation halted")
            self.strategy.aggregate_fit(server_round, [], [])


def run_federation(grid: Grid, study: Study, context: Context) -> dict:
    config = study.config
    done, weights = _resume_point(study)
    if weights is None:
        weights = load_pretrained(study.checkpoint).unet.state_dict()
    strategy = StudyStrategy(study, weights, done)
    if done == 0 and strategy.validator is not None:  # the public checkpoint: a baseline
        loss = strategy._validate(0)
        print(f"[fedsynth] round 0 (public checkpoint): validation loss {loss:.4f}", flush=True)
    remaining = config.federation.rounds - done
    if remaining > 0:
        if config.federation.secure_aggregation:
            fit = SecAggPlusWorkflow(**secagg_settings(study))
        else:
            fit = default_fit_workflow
        workflow = DefaultWorkflow(fit_workflow=_SettledFit(fit, strategy))
        legacy = LegacyContext(context, ServerConfig(num_rounds=remaining), strategy)
        workflow(grid, legacy)
    return write_summary(study, done + strategy.settled, strategy.over)


@app.main()
def main(grid: Grid, context: Context) -> None:
    # all cores: pretraining and validation run while the sites are idle
    try:
        study = prepare(dict(context.run_config), context.run_id)
        print(f"[fedsynth] run dir {study.run_dir}", flush=True)
        summary = run_federation(grid, study, context)
    except FedsynthError as error:
        print(f"[fedsynth] error: {error}", flush=True)
        raise SystemExit(1) from None
    print(ledger_table(summary), flush=True)
    print(f"[fedsynth] study done: {json.dumps(summary)}", flush=True)
