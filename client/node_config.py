"""A site's own settings and privacy terms, from its node config: never from the server.

A hospital starts its SuperNode with
`--node-config 'data-path=DIR state-dir=DIR site-name=NAME max-epsilon=E'` and may add:
- `site-name` (required): the name its spend is recorded under, sent in clear;
- `max-delta`: the largest delta it accepts (default: below 1/(10 n), n its subjects, taken
  as the top of its rounding bucket unless it discloses n: client/public_size.py);
- `require-secure-aggregation` (default true): refuse rounds not under SecAgg+;
- `accountant` (`rdp` or `prv`): refuse studies that account with another one;
- `public-subjects`: the subject count the site declares public (a whole number, at most
  its real count, else it refuses with reason `config`): its FedAvg weight, and what its
  Poisson rate is planned from (client/public_size.py). It needs `max-delta`: with a
  declared size the site checks a study's delta against max-delta alone, so that no
  answer it gives the server depends on its real count;
- `disclose-subject-count` (default false): publish the exact subject count instead.
  With neither, the published count is the real one rounded down to two significant
  figures and a multiple of 10 (347 -> 340; at least 1).
`site-name` and `max-epsilon` are required for a real site: a hospital names itself (the
data folder's name may be a patient or study id) and states its own ceiling.

In a `flwr run` simulation Flower gives each node only its `partition-id`, so the site is
the phantom site of that number, with its state inside the study's run dir (a new
simulated study starts with fresh phantom hospitals), its maximum epsilon the study's
target and secure aggregation required only when the study uses it; it publishes its
subject count rounded, as a hospital does by default (a 300-subject phantom site: 300).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fedsynth.common.errors import FedsynthError

ACCOUNTANTS = ("rdp", "prv")

# A node config as Flower gives it (flwr.app.user_config.UserConfig's values)
NodeConfig = Mapping[str, bool | float | int | str]


@dataclass(frozen=True)
class SiteSettings:
    """One site's name, data folder, state dir and privacy terms."""

    name: str
    data_path: Path
    state_dir: Path
    max_epsilon: float
    max_delta: float | None = None  # None: below 1/(10 n)
    require_secure_aggregation: bool = True
    accountant: str | None = None  # None: either
    public_subjects: int | None = None  # the declared public size; None: not declared
    disclose_subject_count: bool = False  # publish the exact count (opt-in)


def _positive(node_config: NodeConfig, key: str, default: float | None) -> float:
    raw = node_config.get(key, default)
    if raw is None:
        raise FedsynthError(
            f"node config lacks {key}: a site states its own ceiling, e.g. "
            f"--node-config '... {key}=8'"
        )
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise FedsynthError(f"node config {key}={raw!r}: not a number") from None
    if not value > 0 or math.isinf(value):
        raise FedsynthError(f"node config {key}={raw!r}: must be a positive number")
    return value


def _flag(node_config: NodeConfig, key: str, default: bool) -> bool:
    raw = node_config.get(key, default)
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise FedsynthError(f"node config {key}={raw!r}: must be true or false")


def _whole(node_config: NodeConfig, key: str) -> int | None:
    raw = node_config.get(key)
    if raw is None:
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(raw, bool) or not (value >= 1 and value.is_integer()):
        raise FedsynthError(f"node config {key}={raw!r}: must be a whole number of at least 1")
    return int(value)


def site_settings(
    node_config: NodeConfig,
    target_epsilon: float,
    simulation_data: Path | None = None,
    simulation_state: Path | None = None,
    secure_aggregation: bool = True,
) -> SiteSettings:
    """The site's settings; simulation folders and terms fill in only what a simulated node
    lacks. Raises FedsynthError naming the node config key that is missing or invalid."""
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
                    "'data-path=DIR state-dir=DIR site-name=NAME max-epsilon=E'"
                )
        data_path = Path(str(node_config["data-path"])).expanduser()
        state_dir = Path(str(node_config["state-dir"])).expanduser()
        name = str(node_config.get("site-name", "")).strip()
        if not name:  # the data folder's name may be a patient or study id: never sent
            raise FedsynthError(
                "node config lacks site-name: the name the site's spend is recorded under, "
                "sent to the server in clear (e.g. site-name=hospital-a)"
            )
    max_epsilon = _positive(node_config, "max-epsilon", target_epsilon if simulated else None)
    max_delta = None
    if "max-delta" in node_config:
        max_delta = _positive(node_config, "max-delta", None)
        if max_delta >= 1:
            raise FedsynthError(f"node config max-delta={max_delta:g}: must be below 1")
    accountant = node_config.get("accountant")
    if accountant is not None and str(accountant) not in ACCOUNTANTS:
        raise FedsynthError(f"node config accountant={accountant!r}: one of rdp, prv")
    require = _flag(
        node_config, "require-secure-aggregation", secure_aggregation if simulated else True
    )
    public_subjects = _whole(node_config, "public-subjects")
    disclose = _flag(node_config, "disclose-subject-count", False)
    if disclose and public_subjects is not None:
        raise FedsynthError(
            "node config sets both public-subjects and disclose-subject-count=true: "
            "set one (disclose-subject-count publishes the exact count)"
        )
    if public_subjects is not None and max_delta is None:
        raise FedsynthError(
            "node config sets public-subjects without max-delta: a site that declares its "
            "size states the largest delta it accepts (below 1/its subject count), e.g. "
            "max-delta=1e-5"
        )
    return SiteSettings(
        name,
        data_path,
        state_dir,
        max_epsilon,
        max_delta,
        require,
        str(accountant) if accountant is not None else None,
        public_subjects,
        disclose,
    )
