"""What a study is: its config, run dir, public checkpoint, and its fixed privacy terms.

The ServerApp runs wherever the SuperLink started, so every path here is absolute. A
study with real sites names its public checkpoint (run config `checkpoint`); a simulation
gets its phantom sites and checkpoint from a `Simulate` hook (fedsynth.simulations), so
that nothing under server/ depends on the phantom generator.

A study's delta and accountant are fixed when it starts (run-dir/terms.json): every
epsilon in its ledger is computed with them, and a resume that changes either would
silently restate all of them (the same spend is epsilon 9.95 at delta 1e-5 and 5.23 at
0.04), so it is refused.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsynth.common.config import Config, load_config
from fedsynth.common.errors import FedsynthError
from fedsynth.common.io import atomic_write_text
from fedsynth.server.run_dir import LEDGER

TERMS = "terms.json"
RESERVED = (
    "config",
    "run-dir",
    "resume",
    "checkpoint",
    "validation-data",
    "phantom-subjects",
    "phantom-public-subjects",
    "secagg-clipping-range",
    "secagg-max-weight",
)
CLIPPING_RANGE = 4.0  # |delta| bound under SecAgg+; a site with a larger delta fails
DEFAULT_PHANTOM_SUBJECTS = 300  # subjects per simulated site (run config phantom-subjects)
DEFAULT_PUBLIC_SUBJECTS = 200  # public phantom subjects pretrained on (phantom-public-subjects)


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
    study_id: str = "study"  # fixed at the start (terms.json); sites tag their rounds with it
    site_domain: Path | None = None  # simulation only: held-out subjects of each site's profile


@dataclass(frozen=True)
class SimulatedData:
    """What a simulation prepares: phantom sites, a public checkpoint, validation data and
    (simulation only) held-out subjects of each site's profile, site-1..K."""

    phantoms: Path
    checkpoint: Path
    validation: Path | None
    site_domain: Path | None = None


# (config, cache dir, phantom subjects per site) -> the simulation's data
Simulate = Callable[[Config, Path, int, int], SimulatedData]  # config, cache, site, public


def cache_dir(config: Config) -> Path:
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


def _count(run_config: dict[str, Any], key: str, default: int) -> int:
    """A whole number of at least 2 from the run config (phantom subjects)."""
    value = run_config.get(key, default)
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = 0
    if count < 2 or str(count) != str(value).strip():
        raise FedsynthError(f"run config {key}={value!r}: must be a whole number of at least 2")
    return count


def _folder(run_config: dict[str, Any], key: str) -> Path | None:
    text = str(run_config.get(key, "") or "")
    if not text:
        return None
    folder = Path(text).expanduser().resolve()
    if not folder.is_dir():
        raise FedsynthError(f"run config {key}={text!r}: no such folder")
    return folder


def fix_terms(config: Config, run_dir: Path, resume: bool) -> str:
    """Record the study's id, delta and accountant at its start; refuse a resume that
    changes delta or accountant. Returns the study id (a random hex string).

    Raises FedsynthError naming the changed term and both values.
    """
    path = run_dir / TERMS
    ours = {"delta": config.privacy.delta, "accountant": config.privacy.accountant}
    if resume and path.is_file():
        fixed = json.loads(path.read_text())
        for key, value in ours.items():
            if fixed.get(key) != value:
                raise FedsynthError(
                    f"{run_dir}: this study's privacy.{key} is {fixed.get(key)!r}, fixed when "
                    f"it started; the resume asks for {value!r}. Every epsilon in its ledger "
                    "is computed with it: resume with the same value, or start a new study"
                )
        return str(fixed["study_id"])
    study_id = uuid.uuid4().hex
    atomic_write_text(path, json.dumps({**ours, "study_id": study_id}) + "\n")
    return study_id


def prepare(
    run_config: dict[str, Any], run_id: int | str = "", simulate: Simulate | None = None
) -> Study:
    """Config, run dir, fixed terms, public checkpoint and (simulation) data.

    With run config `checkpoint` (a public checkpoint folder) real sites are expected and
    nothing is generated; `validation-data` names public held-out data for validation.
    Without it, `simulate` prepares phantom sites (cached); without either, an error.
    """
    config = load_config(
        str(run_config.get("config", "default") or "default"), config_overrides(run_config)
    )
    subjects = _count(run_config, "phantom-subjects", DEFAULT_PHANTOM_SUBJECTS)
    public = _count(run_config, "phantom-public-subjects", DEFAULT_PUBLIC_SUBJECTS)
    cache = cache_dir(config)
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
    study_id = fix_terms(config, run_dir, resume)

    checkpoint = _folder(run_config, "checkpoint")
    validation = _folder(run_config, "validation-data")
    phantoms = site_domain = None
    if checkpoint is None:
        if simulate is None:
            raise FedsynthError(
                "run config checkpoint is empty: name the public checkpoint folder "
                "(-c checkpoint=DIR), or run the simulation app"
            )
        data = simulate(config, cache, subjects, public)
        phantoms, checkpoint = data.phantoms, data.checkpoint
        validation = validation or data.validation
        site_domain = data.site_domain
    clipping = float(run_config.get("secagg-clipping-range", 0) or CLIPPING_RANGE)
    max_weight = float(run_config.get("secagg-max-weight", 0) or subjects)
    return Study(
        config,
        run_dir,
        phantoms,
        checkpoint,
        resume,
        clipping,
        max_weight,
        validation,
        study_id,
        site_domain,
    )
