"""What a study is: its config, run dir, public checkpoint, and its fixed privacy terms.

The ServerApp runs wherever the SuperLink started, so every path here is absolute. Run
config `data` says where the sites' data is: "sites" (a study with real hospitals; it
names its public checkpoint, run config `checkpoint`) or "phantoms" (a simulation: phantom
sites and a public checkpoint generated and cached by fedsynth.simulations.study_data,
imported only then, so a coordinator's or hospital's deployment never loads the phantom
generator).

A study's privacy terms (delta, accountant, target epsilon, min-sites, secure
aggregation) are fixed when it starts, and a resume that changes one is refused
(server/study_terms.py).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsynth.common.config import Config, load_config
from fedsynth.common.errors import FedsynthError
from fedsynth.server.run_dir import LEDGER
from fedsynth.server.study_terms import fix_terms
from fedsynth.server.validation import SiteDomainFactory

DATA = ("phantoms", "sites")  # run config `data`: a simulation, or real sites
RESERVED = (
    "config",
    "data",
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
    site_domain: SiteDomainFactory | None = None  # simulation only: see server/validation.py


@dataclass(frozen=True)
class SimulatedData:
    """What a simulation prepares: phantom sites, a public checkpoint, validation data,
    held-out subjects of each site's profile (site-1..K) and what builds the check that
    measures the model on them (simulation only)."""

    phantoms: Path
    checkpoint: Path
    validation: Path | None
    held_out: Path
    site_domain: SiteDomainFactory


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


def _data(run_config: dict[str, Any]) -> tuple[bool, Path | None]:
    """(simulated, checkpoint) from run config `data` and `checkpoint`, checked together."""
    data = str(run_config.get("data", "sites") or "sites").strip()
    checkpoint = _folder(run_config, "checkpoint")
    if data not in DATA:
        raise FedsynthError(
            f'run config data={data!r}: must be "phantoms" (a simulation on generated '
            'phantom sites) or "sites" (real sites; name the public checkpoint)'
        )
    if data == "sites" and checkpoint is None:
        raise FedsynthError(
            'run config data="sites" and checkpoint is empty: name the public checkpoint '
            "folder (-c checkpoint=DIR), or run a simulation (-c data=phantoms)"
        )
    if data == "phantoms" and checkpoint is not None:
        raise FedsynthError(
            "run config checkpoint names a public checkpoint, which a study with real sites "
            'uses, but data is "phantoms" (a simulation pretrains its own): add '
            "-c data=sites"
        )
    return data == "phantoms", checkpoint


def prepare(run_config: dict[str, Any], run_id: int | str = "") -> Study:
    """Config, run dir, fixed terms, public checkpoint and (simulation) data.

    Run config `data` "sites" (the default outside pyproject): real sites are expected,
    `checkpoint` names the public checkpoint and nothing is generated; "phantoms": phantom
    sites and a public checkpoint are generated once and cached. `validation-data` names
    public held-out data for validation (a simulation draws its own otherwise).
    Raises FedsynthError naming the run config key and value that cannot be used.
    """
    config = load_config(
        str(run_config.get("config", "default") or "default"), config_overrides(run_config)
    )
    subjects = _count(run_config, "phantom-subjects", DEFAULT_PHANTOM_SUBJECTS)
    public = _count(run_config, "phantom-public-subjects", DEFAULT_PUBLIC_SUBJECTS)
    simulated, checkpoint = _data(run_config)
    validation = _folder(run_config, "validation-data")
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

    phantoms = site_domain = None
    if simulated:
        from fedsynth.simulations.study_data import simulated_data  # a simulation only

        data = simulated_data(config, cache, subjects, public)
        phantoms, checkpoint = data.phantoms, data.checkpoint
        validation = validation or data.validation
        site_domain = data.site_domain
    assert checkpoint is not None  # _data: real sites name theirs, a simulation made one
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
