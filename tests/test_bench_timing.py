"""The bench's one interleaving helper and its figures (simulations/bench_timing.py).

Fixed clocks and simulated loads here: what is checked is the order of the measurements
and the statistics of a figure, not how fast this machine is.
"""

from __future__ import annotations

import pytest
import torch

from fedsynth.common.errors import FedsynthError
from fedsynth.simulations import bench_timing
from fedsynth.simulations.bench_timing import Figure, interleaved, single, timed_ratio


class Machine:
    """A machine whose load changes with every call: a side's "seconds" are its own
    work times the load at the moment it runs."""

    def __init__(self, load):
        self.load, self.calls, self.order = load, 0, []

    def side(self, name: str, work: float):
        def measure() -> float:
            self.order.append(name)
            self.calls += 1
            return work * self.load(self.calls)

        return measure


def test_the_sides_alternate_in_abba_pairs_and_each_pair_gives_a_ratio():
    machine = Machine(lambda call: 1.0)
    figure = interleaved(machine.side("A", 3.0), machine.side("B", 2.0), 5, "A over B")
    assert machine.order == ["A", "B", "B", "A", "A", "B", "B", "A", "A", "B"]
    assert figure.samples == (1.5,) * 5 and figure.repeats == 5
    assert figure.numerators == (3.0,) * 5 and figure.denominators == (2.0,) * 5
    assert figure.method.startswith("A over B; 5 interleaved pair(s)")


def test_a_ratio_holds_when_the_load_jumps_tenfold_between_two_measurements():
    """On a machine that gets ten times slower after the 7th call (another job starts),
    one timing of each side, taken apart, is off by ten; the median of interleaved
    pairs is the true ratio (only the pair the jump falls in is off)."""
    load = lambda call: 1.0 if call <= 7 else 10.0  # noqa: E731
    apart = Machine(load)
    first = apart.side("A", 1.2)()
    for _ in range(6):
        apart.side("other", 1.0)()  # the rest of a bench run
    assert first / apart.side("B", 1.0)() == pytest.approx(0.12)  # not 1.2: off by ten
    machine = Machine(load)
    figure = interleaved(machine.side("A", 1.2), machine.side("B", 1.0), 9, "A over B")
    assert figure.median == pytest.approx(1.2)
    assert sum(s != pytest.approx(1.2) for s in figure.samples) == 1  # the pair of call 7-8
    assert figure.quartiles == pytest.approx((1.2, 1.2))
    assert max(figure.samples) == pytest.approx(12.0)  # the spread shows the jump


def test_abba_order_cancels_a_steadily_growing_load():
    """A load growing 5% a call biases A-then-B pairs down and B-then-A pairs up by as
    much; their median stays within that of the true ratio, their spread shows it."""
    machine = Machine(lambda call: 1.05**call)
    figure = interleaved(machine.side("A", 2.0), machine.side("B", 1.0), 8, "A over B")
    low, high = 2.0 / 1.05, 2.0 * 1.05
    assert sorted(set(round(s, 9) for s in figure.samples)) == pytest.approx([low, high])
    assert low < figure.median < high and figure.median == pytest.approx(2.0, rel=0.01)


def test_a_figure_gives_its_median_quartiles_and_range():
    figure = Figure((5.0, 1.0, 4.0, 2.0, 3.0), "a method")
    assert figure.median == 3.0 and float(figure) == 3.0
    assert figure.quartiles == (2.0, 4.0)
    assert figure.as_json() == {
        "median": 3.0,
        "repeats": 5,
        "q1": 2.0,
        "q3": 4.0,
        "min": 1.0,
        "max": 5.0,
        "samples": [5.0, 1.0, 4.0, 2.0, 3.0],
        "method": "a method",
    }
    once = single(407496, "counted")
    assert once.as_json() == {"median": 407496.0, "repeats": 1, "method": "counted"}
    assert once.quartiles == (407496.0, 407496.0)
    with pytest.raises(FedsynthError, match="at least one sample"):
        Figure((), "nothing")


def test_bad_repeats_warmups_and_denominators_are_refused():
    with pytest.raises(FedsynthError, match="at least one pair"):
        interleaved(lambda: 1.0, lambda: 1.0, 0, "A over B")
    with pytest.raises(FedsynthError, match="warms up at least once"):
        timed_ratio(lambda: None, lambda: None, 3, "A over B", warmup=0)
    with pytest.raises(FedsynthError, match="a denominator measured 0"):
        interleaved(lambda: 1.0, lambda: 0.0, 1, "A over B")


@pytest.mark.parametrize(
    ("warm_seconds", "timer"), [(0.1, "blocked_autorange"), (3.0, "time.perf_counter")]
)
def test_timed_ratio_warms_up_then_times_both_sides_alike(monkeypatch, warm_seconds, timer):
    """Short calls are timed by blocked_autorange, long ones by one call each; either
    way both sides of a ratio alike, after a warm-up call of each."""
    log = []

    def clock(work):
        log.append(("seconds", work()))
        return warm_seconds

    def blocked(work):
        log.append(("blocked", work()))
        return warm_seconds

    monkeypatch.setattr(bench_timing, "seconds", clock)
    monkeypatch.setattr(bench_timing, "blocked_seconds", blocked)
    figure = timed_ratio(lambda: "A", lambda: "B", 2, "A over B")
    how = "blocked" if timer == "blocked_autorange" else "seconds"
    warm = [("seconds", "A"), ("seconds", "B")]
    assert log == [*warm, (how, "A"), (how, "B"), (how, "B"), (how, "A")]
    assert figure.samples == (1.0, 1.0)
    assert "1 warm-up call(s) of each side" in figure.method and timer in figure.method


def test_blocked_timing_keeps_torch_s_threads(monkeypatch):
    """torch.utils.benchmark's Timer runs on one thread unless told: the bench's timing
    runs the work on as many threads as torch has, as the code it measures would."""
    monkeypatch.setattr(bench_timing, "BLOCK_S", 0.01)
    threads = torch.get_num_threads()
    seen = []
    try:
        torch.set_num_threads(2)
        seconds = bench_timing.blocked_seconds(lambda: seen.append(torch.get_num_threads()))
    finally:
        torch.set_num_threads(threads)
    assert seen and set(seen) == {2} and seconds > 0


def test_hardware_names_the_machine():
    hardware = bench_timing.hardware(torch.device("cpu"))
    assert hardware["device"] == "cpu" and hardware["torch"] == torch.__version__
    assert hardware["cores"] >= 1 and hardware["torch_threads"] == torch.get_num_threads()
    assert hardware["cpu"] and hardware["platform"]
