"""How `fedsynth bench` turns repeated measurements into a figure with its spread.

A ratio of two timings taken at different moments measures the machine's load as much
as the code: on one shared machine `dp_step_over_nonprivate` read 0.83 and then 10.48
within an hour, the DP and the plain step timed minutes apart under changing load. So
the two sides of every ratio are measured in turn in one process, after a warm-up of
each, as adjacent pairs in ABBA order (A B, B A, A B, ...: a load that drifts steadily
weighs on both sides alike), and the figure is the median of the pairs' ratios, with
their quartiles, min and max and the number of pairs (`interleaved`, the one helper
every ratio key goes through). A side that is a short call is timed by
`torch.utils.benchmark`'s `Timer.blocked_autorange` (a block of calls, its median per
call); a long one (a second and more, where a timer's overhead does not matter) by one
call between two `time.perf_counter` readings (`timed_ratio`).

A `Figure` also holds figures that are not ratios of two timings: a fraction read
within one round (its repeats are the rounds), a peak memory or a byte count (measured
once: they do not depend on the machine's load), each with a line saying how.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils import benchmark

from fedsynth.common.errors import FedsynthError

BLOCKED_BELOW_S = 2.0  # sides whose warm-up call is shorter are timed by blocked_autorange
BLOCK_S = 1.0  # its min_run_time: the calls of one side in one pair take at least this long
DIGITS = 3  # decimals of the figures in the bench's JSON


@dataclass(frozen=True)
class Figure:
    """A measured figure: its samples (a ratio per interleaved pair, a fraction per round,
    or one value), how it was measured, and for a ratio of pairs each pair's two sides."""

    samples: tuple[float, ...]
    method: str
    numerators: tuple[float, ...] = ()
    denominators: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not self.samples:
            raise FedsynthError(f"a figure needs at least one sample ({self.method})")

    @property
    def median(self) -> float:
        return float(statistics.median(self.samples))

    @property
    def repeats(self) -> int:
        return len(self.samples)

    @property
    def quartiles(self) -> tuple[float, float]:
        """The first and third quartile of the samples (both the value when one)."""
        if self.repeats < 2:
            return self.samples[0], self.samples[0]
        q1, _, q3 = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q1, q3

    def __float__(self) -> float:
        return self.median

    def as_json(self, digits: int = DIGITS) -> dict:
        """median, repeats and method; where there are several samples also q1, q3, min,
        max and the samples themselves (`digits` decimals)."""
        out: dict = {"median": round(self.median, digits), "repeats": self.repeats}
        if self.repeats > 1:
            q1, q3 = self.quartiles
            out |= {
                "q1": round(q1, digits),
                "q3": round(q3, digits),
                "min": round(min(self.samples), digits),
                "max": round(max(self.samples), digits),
                "samples": [round(s, digits) for s in self.samples],
            }
        out["method"] = self.method
        return out


def single(value: float, method: str) -> Figure:
    """A figure measured once (a byte count, a peak memory)."""
    return Figure((float(value),), method)


def interleaved(
    numerator: Callable[[], float], denominator: Callable[[], float], repeats: int, method: str
) -> Figure:
    """numerator() / denominator() in `repeats` adjacent pairs, in ABBA order (A B, B A,
    A B, ...); the figure's samples are the pairs' ratios. Each side returns one
    measurement of itself (seconds of a call, seconds per site of a round, ...); warming
    up is the caller's (`timed_ratio`)."""
    if repeats < 1:
        raise FedsynthError(f"an interleaved ratio needs at least one pair, got {repeats}")
    tops: list[float] = []
    bottoms: list[float] = []
    for pair in range(repeats):
        if pair % 2 == 0:
            top = numerator()
            bottom = denominator()
        else:
            bottom = denominator()
            top = numerator()
        if not bottom > 0:
            raise FedsynthError(f"{method}: a denominator measured {bottom}")
        tops.append(top)
        bottoms.append(bottom)
    ratios = tuple(t / b for t, b in zip(tops, bottoms, strict=True))
    how = f"{repeats} interleaved pair(s) (A B, B A, ...), median of the pairs' ratios"
    return Figure(ratios, f"{method}; {how}", tuple(tops), tuple(bottoms))


def seconds(work: Callable[[], object]) -> float:
    """Wall seconds of one call of `work` (CUDA synchronized at the end where there is one)."""
    start = time.perf_counter()
    work()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def blocked_seconds(work: Callable[[], object]) -> float:
    """Seconds per call of `work` by `Timer.blocked_autorange` (BLOCK_S of calls after one
    it times to size the block; the median per call), on as many threads as torch has now
    (Timer's default of one would change what is measured)."""
    timer = benchmark.Timer(
        stmt="work()", globals={"work": work}, num_threads=torch.get_num_threads()
    )
    return float(timer.blocked_autorange(min_run_time=BLOCK_S).median)


def timed_ratio(
    numerator: Callable[[], object],
    denominator: Callable[[], object],
    repeats: int,
    what: str,
    warmup: int = 1,
) -> Figure:
    """Seconds of a call of `numerator` over seconds of a call of `denominator`:
    `warmup` (at least 1) calls of each first, then `interleaved` pairs. Both sides are
    timed alike: by `blocked_seconds` where every warm-up call took under
    BLOCKED_BELOW_S, otherwise by one call each (`seconds`)."""
    if warmup < 1:
        raise FedsynthError(f"a timed ratio warms up at least once, got {warmup}")
    warm = [seconds(work) for _ in range(warmup) for work in (numerator, denominator)]
    if max(warm) < BLOCKED_BELOW_S:
        side = blocked_seconds
        how = (
            f"each side timed by torch.utils.benchmark blocked_autorange (min_run_time {BLOCK_S} s)"
        )
    else:
        side = seconds
        how = "each side one call timed by time.perf_counter"
    return interleaved(
        lambda: side(numerator),
        lambda: side(denominator),
        repeats,
        f"{what}; {warmup} warm-up call(s) of each side; {how}",
    )


def _cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what `platform` says."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def hardware(device: torch.device) -> dict:
    """What the figures were measured on: platform, CPU model, cores (the machine's and
    those this process may run on), Python, torch, its threads, OMP_NUM_THREADS and the
    device."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def load_average() -> list[float] | None:
    """The machine's load average over 1, 5 and 15 minutes (None where unknown)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
