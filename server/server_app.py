"""The coordinator of a `flwr run` study: prepare, then rounds of FedAvg with a ledger.

Preparation (all paths absolute: the ServerApp runs wherever the SuperLink started):
the config (run config `config`, a preset or YAML path, plus any other run config keys
as dotted overrides), the run dir (run config `run-dir`, else `paths.run-dir`, else a new
folder under the cache dir), phantom sites (cached), and the public checkpoint (pretrained
once per config and cached).

Each round: send the global UNet and the study config to the sites, read back weights
and (noise_multiplier, sample_rate, steps), append one server ledger line per site with
epsilon recomputed from that site's whole history (write-ahead), and only then save the
round's checkpoint (a full checkpoint folder, published by an atomic state.json).

This slice aggregates in the clear (plain FedAvg): summary.json says
`secure_aggregation: false` whatever the config asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedsynth.common.accountant import Segment, epsilon
from fedsynth.common.checkpoint import (
    AUTOENCODER,
    UNET,
    load_pretrained,
    read_metadata,
    save_torch,
    write_metadata,
)
from fedsynth.common.config import Config, config_hash, load_config, to_dict
from fedsynth.common.errors import FedsynthError
from fedsynth.common.io import atomic_write_text
from fedsynth.common.ledger import append_entry, read_ledger, spent_segments

LEDGER = "ledger.jsonl"
SUMMARY = "summary.json"
STATE = "state.json"
RESERVED = ("config", "run-dir", "resume", "phantom-subjects")
NODE_WAIT_S = 120.0

app = ServerApp()


@dataclass(frozen=True)
class Study:
    config: Config
    run_dir: Path
    phantoms: Path
    checkpoint: Path
    resume: bool


def _cache_dir(config: Config) -> Path:
    if config.paths.cache_dir:
        return Path(config.paths.cache_dir).expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser().resolve() / "fedsynth"


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


def prepare(run_config: dict[str, Any], run_id: int | str = "") -> Study:
    """Config, run dir, phantoms and public checkpoint, generated/pretrained when missing."""
    overrides = {k: v for k, v in run_config.items() if k not in RESERVED}
    config = load_config(str(run_config.get("config", "default") or "default"), overrides)
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
    sites, seed = config.federation.sites, config.seed
    phantoms = cache / "phantoms" / f"sites{sites}-subjects{subjects}-seed{seed}"
    if not (phantoms / f"site-{sites}" / "manifest.csv").is_file():
        from fedsynth.simulations.phantoms import generate_cohorts

        print(f"[fedsynth] generating phantoms in {phantoms}", flush=True)
        generate_cohorts(phantoms, sites=sites, subjects=subjects, seed=seed, progress=False)

    data_hash = hashlib.sha256((phantoms / "public" / "manifest.csv").read_bytes()).hexdigest()
    checkpoint = cache / "pretrained" / f"{config_hash(config)}-{data_hash[:12]}"
    try:
        load_pretrained(checkpoint)
    except FedsynthError:
        from fedsynth.server.pretrain import pretrain

        print(f"[fedsynth] pretraining on public phantoms into {checkpoint}", flush=True)
        pretrain(config, phantoms / "public", checkpoint, show_progress=False)
    return Study(config, run_dir, phantoms, checkpoint, resume)


def _wait_for_nodes(grid: Grid, wanted: int) -> list[int]:
    deadline = time.monotonic() + NODE_WAIT_S
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    if not nodes:
        raise FedsynthError(f"no site connected within {NODE_WAIT_S:.0f} s")
    return nodes


def fedavg(updates: list[tuple[dict[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    """Subject-weighted mean of float tensors; other tensors (counters) from the first."""
    total = sum(n for _, n in updates)
    first = updates[0][0]
    out = {}
    for key, value in first.items():
        if value.is_floating_point():
            out[key] = sum(w[key].double() * (n / total) for w, n in updates).to(value.dtype)
        else:
            out[key] = value.clone()
    return out


def _round_dir(run_dir: Path, round_number: int) -> Path:
    return run_dir / "rounds" / f"round-{round_number:03d}"


def save_round(
    study: Study, round_number: int, weights: dict[str, torch.Tensor], facts: dict
) -> Path:
    """A full checkpoint folder for this round, then state.json pointing to it (atomic)."""
    folder = _round_dir(study.run_dir, round_number)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / AUTOENCODER).is_file():
        shutil.copyfile(study.checkpoint / AUTOENCODER, folder / AUTOENCODER)
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
        "secure_aggregation": False,  # this slice aggregates in the clear
        "secure_aggregation_requested": study.config.federation.secure_aggregation,
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
    weights = torch.load(
        _round_dir(study.run_dir, rounds_done) / UNET, map_location="cpu", weights_only=True
    )
    return rounds_done, weights


def run_federation(grid: Grid, study: Study) -> dict:
    config = study.config
    done, weights = _resume_point(study)
    if weights is None:
        weights = load_pretrained(study.checkpoint).unet.state_dict()
    # which site a node is (sites tell us in their replies), and its last plan, for charging
    # a site that was sent an instruction and did not answer
    site_of: dict[int, str] = {}
    last_segment: dict[str, Segment] = {}
    for e in read_ledger(study.run_dir / LEDGER):
        if e["status"] == "trained":
            last_segment[e["site"]] = Segment(
                float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])
            )
    study_text = json.dumps(to_dict(config))
    for round_number in range(done + 1, config.federation.rounds + 1):
        nodes = _wait_for_nodes(grid, config.federation.sites_per_round)
        chosen = nodes[: config.federation.sites_per_round]
        print(f"[fedsynth] round {round_number}: {len(chosen)} sites", flush=True)
        arrays = ArrayRecord({k: v.detach().cpu().contiguous() for k, v in weights.items()})
        instruction = ConfigRecord(
            {
                "round": round_number,
                "study": study_text,
                "checkpoint": str(study.checkpoint),
                "phantoms": str(study.phantoms),
                "site-states": str(study.run_dir / "sites"),
            }
        )
        messages = [
            Message(
                RecordDict({"arrays": arrays, "config": instruction}),
                dst_node_id=node,
                message_type=MessageType.TRAIN,
                group_id=str(round_number),
            )
            for node in chosen
        ]
        replies = {r.metadata.src_node_id: r for r in grid.send_and_receive(messages)}
        updates = []
        for node in chosen:
            reply = replies.get(node)
            if reply is None or reply.has_error():
                site = site_of.get(node, f"node-{node}")
                why = reply.error.reason if reply is not None else "no reply"
                print(f"[fedsynth] round {round_number}: {site} failed: {why}", flush=True)
                # charged anyway, with its last known plan (its own ledger is authoritative)
                _ledger_line(study, round_number, site, last_segment.get(site), "no-reply")
                continue
            site = str(reply.content["site"]["site"])
            site_of[node] = site
            m = reply.content["metrics"]
            if int(m["refused"]):
                reason = reply.content["site"]["reason"]
                print(f"[fedsynth] round {round_number}: {site} refused: {reason}", flush=True)
                _ledger_line(study, round_number, site, None, "refused")
                continue
            segment = Segment(
                float(m["noise_multiplier"]), float(m["sample_rate"]), int(m["steps"])
            )
            last_segment[site] = segment
            _ledger_line(study, round_number, site, segment, "trained")
            updates.append((reply.content["arrays"].to_torch_state_dict(), int(m["subjects"])))
        if updates:
            weights = fedavg(updates)
        # the ledger lines above are on disk (fsync'd) before the round's model is saved
        save_round(study, round_number, weights, {"sites_trained": len(updates)})
        summary = write_summary(study, round_number)
        print(f"[fedsynth] round {round_number} done: {summary['site_epsilon']}", flush=True)
    return write_summary(study, max(done, config.federation.rounds))


@app.main()
def main(grid: Grid, context: Context) -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    study = prepare(dict(context.run_config), context.run_id)
    print(f"[fedsynth] run dir {study.run_dir}", flush=True)
    summary = run_federation(grid, study)
    print(f"[fedsynth] study done: {json.dumps(summary)}", flush=True)
