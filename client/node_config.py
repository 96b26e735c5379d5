"""Where a site's data and state live and how much epsilon it allows: from the node config.

A hospital starts its SuperNode with `--node-config 'data-path=... state-dir=...
max-epsilon=...'` (and optionally `site-name=...`); these are the site's own decisions and
never come from the server. In a `flwr run` simulation Flower gives each node only its
`partition-id`, so the site is the phantom site of that number, with its state inside the
study's run dir (a new simulated study starts with fresh phantom hospitals), and its
maximum epsilon is the study's target.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedsynth.common.errors import FedsynthError


@dataclass(frozen=True)
class SiteSettings:
    """One site's name, data folder, state dir and ceiling on epsilon."""

    name: str
    data_path: Path
    state_dir: Path
    max_epsilon: float


def _positive(node_config: Mapping[str, object], key: str, default: float) -> float:
    raw = node_config.get(key, default)
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise FedsynthError(f"node config {key}={raw!r}: not a number") from None
    if not value > 0 or math.isinf(value):
        raise FedsynthError(f"node config {key}={raw!r}: must be a positive number")
    return value


def site_settings(
    node_config: Mapping[str, object],
    target_epsilon: float,
    simulation_data: Path | None = None,
    simulation_state: Path | None = None,
) -> SiteSettings:
    """The site's settings; simulation folders fill in only what a simulated node lacks."""
    simulated = "partition-id" in node_config and "data-path" not in node_config
    if simulated:
        if simulation_data is None or simulation_state is None:
            raise FedsynthError("a simulated node needs the phantom and run folders")
        name = str(node_config.get("site-name", f"site-{int(node_config['partition-id']) + 1}"))
        data_path, state_dir = simulation_data / name, simulation_state / name
    else:
        for key in ("data-path", "state-dir"):
            if not str(node_config.get(key, "")).strip():
                raise FedsynthError(
                    f"node config lacks {key}: start the SuperNode with --node-config "
                    "'data-path=DIR state-dir=DIR max-epsilon=E'"
                )
        data_path = Path(str(node_config["data-path"])).expanduser()
        state_dir = Path(str(node_config["state-dir"])).expanduser()
        name = str(node_config.get("site-name", data_path.name))
    max_epsilon = _positive(node_config, "max-epsilon", target_epsilon)
    return SiteSettings(name, data_path, state_dir, max_epsilon)
