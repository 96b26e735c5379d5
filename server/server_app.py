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
import os
import shutil
import time
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
from fedsynth.common.ledger import append_entry, read_ledger, spent_segments

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
        if not (checkpoint / "metadata.json").is_file():
            from fedsynth.server.pretrain import pretrain

            print(f"[fedsynth] pretraining on public phantoms into {checkpoint}", flush=True)
            pretrain(config, phantoms / "public", checkpoint, show_progress=False)
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


def write_summary(study: Study, rounds_done: int) -> dict:
    ledger = read_ledger(study.run_dir / LEDGER)
    per_site = site_epsilons(ledger, study.config)
    summary = {
        "rounds_done": rounds_done,
        "rounds_planned": study.config.federation.rounds,
        "target_epsilon": study.config.privacy.target_epsilon,
        "site_epsilon": per_site,
        "study_epsilon": max(per_site.values(), default=0.0),
        "delta": study.config.privacy.delta,
        "accountant": study.config.privacy.accountant,
        "secure_aggregation": bool(study.config.federation.secure_aggregation),
        "checkpoint": str(_round_dir(study.run_dir, rounds_done)) if rounds_done else None,
        "pretrained": str(study.checkpoint),
    }
    atomic_write_text(study.run_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary


def _ledger_line(
    study: Study, round_number: int, site: str, segment: Segment | None, status: str
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
    }
    append_entry(path, entry)
    return entry


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

    configure_fit sends the global weights (every state-dict tensor, in `keys` order) and
    the study config; sites answer DELTAS (trained - global). aggregate_fit writes the
    ledger lines (epsilon recomputed) and only then the round checkpoint. Under SecAgg+
    every result's parameters are the same unmasked weighted mean (the workflow replaced
    them); num_examples and metrics travel in clear, so the ledger is the same.
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
        # which site a node is (sites tell us in their replies), and its last plan, for
        # charging a site that was sent an instruction and did not answer
        self.site_of: dict[int, str] = {}
        self.last_segment: dict[str, Segment] = {}
        for e in read_ledger(study.run_dir / LEDGER):
            if e["status"] == "trained":
                self.last_segment[e["site"]] = Segment(
                    float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])
                )
        self.study_text = json.dumps(to_dict(study.config))

    def _parameters(self) -> Parameters:
        return ndarrays_to_parameters([self.weights[k].numpy() for k in self.keys])

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters:
        return self._parameters()

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        wanted = self.study.config.federation.sites_per_round
        client_manager.wait_for(wanted, timeout=int(NODE_WAIT_S))
        proxies = sorted(client_manager.all().values(), key=lambda p: p.node_id)
        if not proxies:
            raise FedsynthError(f"no site connected within {NODE_WAIT_S:.0f} s")
        chosen = proxies[:wanted]
        self.chosen = [p.node_id for p in chosen]
        round_number = self.done + server_round
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

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        study, round_number = self.study, self.done + server_round
        answered: set[int] = set()
        trained: list[tuple[Parameters, int]] = []
        for proxy, res in results:
            node = proxy.node_id
            answered.add(node)
            m = res.metrics
            site = str(m["site"])
            self.site_of[node] = site
            if int(m["refused"]):
                print(f"[fedsynth] round {round_number}: {site} refused: {m['reason']}")
                _ledger_line(study, round_number, site, None, "refused")
                continue
            segment = Segment(
                float(m["noise_multiplier"]), float(m["sample_rate"]), int(m["steps"])
            )
            self.last_segment[site] = segment
            _ledger_line(study, round_number, site, segment, "trained")
            trained.append((res.parameters, int(res.num_examples)))
        for failure in failures:
            print(f"[fedsynth] round {round_number}: failure: {failure}", flush=True)
        for node in self.chosen:
            if node not in answered:
                site = self.site_of.get(node, f"node-{node}")
                print(f"[fedsynth] round {round_number}: {site} did not answer", flush=True)
                # charged anyway, with its last known plan (its own ledger is authoritative)
                _ledger_line(study, round_number, site, self.last_segment.get(site), "no-reply")
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
        summary = write_summary(study, round_number)
        print(f"[fedsynth] round {round_number} done: {summary['site_epsilon']}", flush=True)
        self.settled = server_round
        return self._parameters(), {}


class _SettledFit:
    """A fit workflow, then aggregate_fit with nothing if it halted (SecAgg+ too few sites)
    so that the round still gets its ledger lines (no-reply) and its checkpoint."""

    def __init__(self, fit: Any, strategy: StudyStrategy) -> None:
        self.fit, self.strategy = fit, strategy

    def __call__(self, grid: Grid, context: LegacyContext) -> None:
        self.fit(grid, context)
        server_round = int(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        if self.strategy.settled != server_round:
            print(f"[fedsynth] round {self.strategy.done + server_round}: aggregation halted")
            self.strategy.aggregate_fit(server_round, [], [])


def run_federation(grid: Grid, study: Study, context: Context) -> dict:
    config = study.config
    done, weights = _resume_point(study)
    if weights is None:
        weights = load_pretrained(study.checkpoint).unet.state_dict()
    strategy = StudyStrategy(study, weights, done)
    remaining = config.federation.rounds - done
    if remaining > 0:
        if config.federation.secure_aggregation:
            fit = SecAggPlusWorkflow(**secagg_settings(study))
        else:
            fit = default_fit_workflow
        workflow = DefaultWorkflow(fit_workflow=_SettledFit(fit, strategy))
        legacy = LegacyContext(context, ServerConfig(num_rounds=remaining), strategy)
        workflow(grid, legacy)
    return write_summary(study, max(done, config.federation.rounds))


@app.main()
def main(grid: Grid, context: Context) -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    study = prepare(dict(context.run_config), context.run_id)
    print(f"[fedsynth] run dir {study.run_dir}", flush=True)
    summary = run_federation(grid, study, context)
    print(f"[fedsynth] study done: {json.dumps(summary)}", flush=True)
