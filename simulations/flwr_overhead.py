"""Where a real `flwr run .` round's time goes, from the run's own timestamps.

The server writes each round's wall-clock start (READY), the time the sites' replies were
in and its end (checkpoint saved, ledger and summary written) to run-dir/timing.json;
each site writes the start and end of its DP-SGD (`train_round`) into its own ledger line
(`dp_sgd`; in a simulation the sites' state dirs are run-dir/sites/NAME). A round's
overhead is the part of its wall time in which no site ran DP-SGD: Flower's messages,
starting ClientApps, SecAgg+ stages, loading the checkpoint and latents, planning noise,
ledgers, aggregation, checkpoints. Round 1 (each site encodes its volumes once) is left
out: the overhead is of the steady rounds 2..R, each from the end of the round before to
its own end, so nothing between rounds escapes it; it is given for each of those rounds
too (`fedsynth bench` reports their median and spread).
"""

from __future__ import annotations

import itertools
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fedsynth.common.config import Config, to_yaml
from fedsynth.common.errors import FedsynthError
from fedsynth.common.ledger import read_ledger
from fedsynth.server.run_dir import TIMING
from fedsynth.simulations.local_flwr import LocalFlower

FLWR_ROUNDS = 4  # round 1 encodes; rounds 2 to 4 are measured
RUN_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class RunOverhead:
    """Rounds 2..R of one run: their wall seconds, the seconds in which at least one site
    ran DP-SGD, the rounds measured, and each of those rounds' overhead."""

    round_seconds: float
    training_seconds: float
    rounds: int
    per_round: tuple[float, ...] = ()

    @property
    def overhead(self) -> float:
        return max(0.0, 1.0 - self.training_seconds / self.round_seconds)


def union_seconds(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Length of the union of `intervals` (start, end) clipped to [start, end]."""
    total, reach = 0.0, start
    for a, b in sorted(intervals):
        a, b = max(a, reach), min(b, end)
        if b > a:
            total += b - a
            reach = b
    return total


def dp_sgd_intervals(run_dir: Path) -> list[tuple[float, float]]:
    """Every DP-SGD (start, end) the simulated sites of `run_dir` recorded."""
    out = []
    for ledger in sorted((run_dir / "sites").glob("*/ledger.jsonl")):
        out += [tuple(e["dp_sgd"]) for e in read_ledger(ledger) if "dp_sgd" in e]
    return out


def run_overhead(run_dir: Path) -> RunOverhead:
    """The overhead of rounds 2..R of the finished simulated study in `run_dir`."""
    path = run_dir / TIMING
    rounds = sorted(json.loads(path.read_text())["rounds"], key=lambda r: r["round"])
    if len(rounds) < 2:
        raise FedsynthError(f"{path}: {len(rounds)} round(s); the overhead needs at least 2")
    intervals = dp_sgd_intervals(run_dir)
    start, end = rounds[0]["ended"], rounds[-1]["ended"]
    trained = union_seconds(intervals, start, end)
    per_round = tuple(
        RunOverhead(
            b["ended"] - a["ended"], union_seconds(intervals, a["ended"], b["ended"]), 1
        ).overhead
        for a, b in itertools.pairwise(rounds)
    )
    return RunOverhead(end - start, trained, len(rounds) - 1, per_round)


def flwr_run_overhead(config: Config, secure: bool, subjects: int) -> RunOverhead:
    """A real `flwr run .` of the quick start's simulated study (its federation config,
    the config's cache dir: the public checkpoint is pretrained first if not cached) with
    FLWR_ROUNDS rounds and `subjects` per phantom site, SecAgg+ on or off, in a Flower
    home and run dir of its own (removed after); its `run_overhead`."""
    with tempfile.TemporaryDirectory(prefix="fedsynth-flwr-bench-") as tmp:
        root = Path(tmp)
        (root / "config.yaml").write_text(to_yaml(config))
        overrides = (
            f'config="{root / "config.yaml"}" run-dir="{root / "run"}" '
            f"phantom-subjects={subjects} federation.rounds={FLWR_ROUNDS} "
            f"federation.secure-aggregation={str(secure).lower()}"
        )
        flower = LocalFlower(root / "flwr-home")
        try:
            flower.run(overrides, RUN_TIMEOUT_S)
        finally:
            flower.stop()
        return run_overhead(root / "run")
