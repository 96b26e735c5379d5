"""A study's run dir: round checkpoints, state.json, summary.json and the ledger table.

run-dir/ledger.jsonl          the server's privacy ledger (server/privacy_ledger.py)
run-dir/terms.json            the privacy terms fixed when the study started (study_terms.py)
run-dir/site-identities.json  each site name's binding to the identity that first claimed
                              it (its node key, or node id) and every release of one (the
                              operator's `fedsynth unbind-site`, a simulation's new Flower
                              run), written atomically before that site's first ledger
                              line; site-identities.json.lock serialises its writers
                              (server/site_identity.py)
run-dir/rounds/round-NNN/     a full checkpoint folder per round (with FedAdam also the
                              server optimiser's state, server/server_optimizer.py)
run-dir/state.json            the last whole round and the SHA-256 of its checkpoint files
                              (written last, atomically): a release checks the checkpoint
                              it samples from is the one this study saved
run-dir/validation/           per-round public validation loss and montage, the held-out
                              volumes beside their autoencoder reconstructions
                              (reconstruction.png, round 0); in a simulation also the
                              site-domain losses (simulations/site_domain.py), the end's
                              fidelity and share of the non-private ceiling's gain
run-dir/summary.json          epsilon per site and for the study, recomputed
run-dir/timing.json           each round's wall-clock start, when the sites' replies were
                              in, and end (Unix seconds; `fedsynth bench` reads it)
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fedsynth.common.anatomy import meter_path
from fedsynth.common.checkpoint import (
    AUTOENCODER,
    UNET,
    file_sha256,
    load_torch,
    read_metadata,
    save_torch,
    write_metadata,
)
from fedsynth.common.feature_net import feature_net_path
from fedsynth.common.io import PUBLIC_MODE, atomic_path, atomic_write_text
from fedsynth.common.ledger import read_ledger

if TYPE_CHECKING:
    from fedsynth.server.study import Study

LEDGER = "ledger.jsonl"
SUMMARY = "summary.json"
SITE_DOMAIN_FIDELITY = "site-domain-fidelity.json"  # in validation/, simulation only
SITE_DOMAIN_CEILING = "site-domain-ceiling.json"  # in validation/, simulation only
RECONSTRUCTION_PNG = "reconstruction.png"  # in validation/: real vs autoencoder, round 0
SITE_DOMAIN_NOTE = (
    "simulation only: the global model's diffusion loss (fixed noise) on held-out phantom "
    "subjects of each site's profile by round (0: the public checkpoint) and, at the end, "
    "the Frechet distance and kernel MMD^2 (evaluation features) of volumes sampled for "
    "their attributes; a real study cannot measure this without the sites spending "
    "privacy on it, and fedsynth offers no such path"
)
STATE = "state.json"
TIMING = "timing.json"


def round_dir(run_dir: Path, round_number: int) -> Path:
    return run_dir / "rounds" / f"round-{round_number:03d}"


def validation_dir(study: Study) -> Path:
    return study.run_dir / "validation"


def save_round(
    study: Study,
    round_number: int,
    weights: dict[str, torch.Tensor],
    facts: dict,
    also: Callable[[Path], None] | None = None,
) -> Path:
    """A full checkpoint folder for this round, then state.json pointing to it (atomic).
    `also(folder)` writes what else the round needs to resume (the server optimiser's
    state) before state.json names the folder."""
    folder = round_dir(study.run_dir, round_number)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / AUTOENCODER).is_file():  # atomic: a torn copy must not pass this check
        with atomic_path(folder / AUTOENCODER) as tmp:
            shutil.copyfile(study.checkpoint / AUTOENCODER, tmp)
    # the public evaluation nets too, so that each round's folder is self-contained
    for source in (feature_net_path(study.checkpoint), meter_path(study.checkpoint)):
        if source.is_file() and not (folder / source.name).is_file():
            with atomic_path(folder / source.name, mode=PUBLIC_MODE) as tmp:
                shutil.copyfile(source, tmp)
    save_torch(folder / UNET, weights)
    pretrained_meta = read_metadata(study.checkpoint)
    stats = {k: pretrained_meta[k] for k in ("latent_mean", "latent_std") if k in pretrained_meta}
    write_metadata(folder, study.config, round=round_number, **stats, **facts)
    if also is not None:
        also(folder)
    state = {
        "rounds_done": round_number,
        "checkpoint": str(folder),
        "sha256": checkpoint_hashes(folder),
    }
    atomic_write_text(study.run_dir / STATE, json.dumps(state) + "\n")
    return folder


def record_round_time(study: Study, round_number: int, **times: float) -> None:
    """Add a round's wall-clock times (Unix seconds: started, replies, ended) to
    timing.json (atomic; a resumed study's rounds are added to those before)."""
    path = study.run_dir / TIMING
    rounds = json.loads(path.read_text())["rounds"] if path.is_file() else []
    rounds = [r for r in rounds if r["round"] != round_number]  # a round re-run on resume
    rounds.append({"round": round_number, **times})
    atomic_write_text(path, json.dumps({"rounds": rounds}, indent=1) + "\n")


def checkpoint_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of a round checkpoint's two networks (file name -> hex digest)."""
    return {name: file_sha256(folder / name) for name in (AUTOENCODER, UNET)}


def resume_point(study: Study) -> tuple[int, dict[str, torch.Tensor] | None]:
    """(rounds done, their weights) of a resumed study; (0, None) for a new one."""
    state = study.run_dir / STATE
    if not study.resume or not state.is_file():
        return 0, None
    rounds_done = int(json.loads(state.read_text())["rounds_done"])
    return rounds_done, load_torch(round_dir(study.run_dir, rounds_done) / UNET)


def _validation_losses(study: Study) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Public validation loss and (simulation only) site-domain losses, by round."""
    public, sites = {}, {}
    for path in sorted(validation_dir(study).glob("round-*.json")):
        entry = json.loads(path.read_text())
        if entry.get("loss") is not None:
            public[str(entry["round"])] = float(entry["loss"])
        if entry.get("site_domain"):
            sites[str(entry["round"])] = entry["site_domain"]
    return public, sites


def write_summary(study: Study, rounds_done: int, ended: str = "") -> dict:
    """summary.json (atomic): per-site and study epsilon recomputed from the ledger."""
    from fedsynth.server.privacy_ledger import site_epsilons

    ledger = read_ledger(study.run_dir / LEDGER)
    per_site = site_epsilons(ledger, study.config)
    montage = validation_dir(study) / f"round-{rounds_done:03d}.png"
    state = study.run_dir / STATE
    saved = json.loads(state.read_text()) if rounds_done and state.is_file() else {}
    public, sites = _validation_losses(study)
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
        "min_sites": study.config.federation.min_sites,
        "checkpoint": str(round_dir(study.run_dir, rounds_done)) if rounds_done else None,
        "checkpoint_sha256": saved.get("sha256"),
        "pretrained": str(study.checkpoint),
        "validation_loss": public,
        "montage": str(montage) if montage.is_file() else None,
    }
    if sites:
        domain: dict[str, Any] = {"note": SITE_DOMAIN_NOTE, "loss": sites}
        fidelity = validation_dir(study) / SITE_DOMAIN_FIDELITY
        if fidelity.is_file():
            domain["fidelity"] = json.loads(fidelity.read_text())
        ceiling = validation_dir(study) / SITE_DOMAIN_CEILING
        if ceiling.is_file():
            domain["ceiling"] = json.loads(ceiling.read_text())
        summary["site_domain"] = domain
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
