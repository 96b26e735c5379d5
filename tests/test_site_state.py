"""Two ClientApps sharing one state dir (two studies on one SuperNode) share one ledger.

The second must plan against the first's spend, never beside it, and an append must never
cut a line another process is writing. Real processes (forked, so nothing is imported
again) race through run_site_round with its data and training replaced by stand-ins that
pause at the point that matters; the accounting and the ledger are the real ones.
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedsynth.client import site_round
from fedsynth.client.budget import LEDGER
from fedsynth.client.node_config import SiteSettings
from fedsynth.common.accountant import epsilon
from fedsynth.common.config import load_config
from fedsynth.common.ledger import append_entry, read_ledger, spent_segments

MAX_EPSILON = 6.0
# one round each: a study plans its whole target into it
STUDY = {
    "federation.rounds": 1,
    "privacy.local-steps": 5,
    "privacy.batch-size": 4,
    "privacy.target-epsilon": MAX_EPSILON,
}
ENTRY = {
    "round": 1,
    "site": "site-1",
    "noise_multiplier": 1.1,
    "sample_rate": 0.2,
    "steps": 10,
    "delta": 1e-5,
    "epsilon": 2.0,
    "status": "trained",
}
DEADLINE_S = 60.0


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def waits_on_a_lock(pid: int) -> bool:
    """Whether process `pid` is blocked on a file lock (Linux /proc/locks: '->' lines)."""
    return any("->" in line and f" {pid} " in line for line in Path("/proc/locks").open())


@pytest.fixture
def stand_ins(tmp_path, monkeypatch):
    """run_site_round without a checkpoint or data: 20 subjects, and a training step that
    marks the moment it starts; the first study's then waits for `go`."""
    marks = tmp_path / "marks"
    marks.mkdir()
    unet = SimpleNamespace(load_state_dict=lambda weights: None, state_dict=lambda: {})
    monkeypatch.setattr(site_round, "load_pretrained", lambda *a: SimpleNamespace(unet=unet))
    monkeypatch.setattr(site_round, "_global_state", lambda *a: {})  # no checkpoint to match

    def latents(*args):
        (marks / f"{multiprocessing.current_process().name}-latents").touch()
        return SimpleNamespace(n_subjects=20, latents=None, attributes=None, subjects=None)

    def train(*args, **kwargs):
        name = multiprocessing.current_process().name
        (marks / f"{name}-training").touch()
        if name == "first":
            wait_for((marks / "go").exists, "go")
        return SimpleNamespace(optimizer_state={})  # what the site keeps for its next round

    monkeypatch.setattr(site_round, "site_latents", latents)
    monkeypatch.setattr(site_round, "train_round", train)
    return marks


def study_round(state: Path) -> None:
    settings = SiteSettings("site-1", state / "no-data", state, MAX_EPSILON)
    site_round.run_site_round(settings, load_config("tiny", STUDY), "unused", {}, 1)


def test_a_second_study_plans_against_the_first_ones_spend(tmp_path, stand_ins):
    if not Path("/proc/locks").is_file():
        pytest.skip("needs /proc/locks to see a process wait on the ledger lock")
    state = tmp_path / "state"
    fork = multiprocessing.get_context("fork")
    first = fork.Process(target=study_round, args=(state,), name="first")
    first.start()
    wait_for((stand_ins / "first-training").exists, "the first study to plan and train")

    second = fork.Process(target=study_round, args=(state,), name="second")
    second.start()
    # the second study has its data and now plans: it must wait for the first's round
    wait_for((stand_ins / "second-latents").exists, "the second study to read its data")
    wait_for(
        lambda: waits_on_a_lock(second.pid) or (stand_ins / "second-training").exists(),
        "the second study to wait on the lock, or to plan without it",
    )
    (stand_ins / "go").touch()
    for process in (first, second):
        process.join(DEADLINE_S)
        assert process.exitcode == 0

    # the second study saw the first's 5.96 and planned only what was left of 6 (sigma 10)
    entries = read_ledger(state / LEDGER)
    assert len(entries) == 2 and entries[1]["noise_multiplier"] > 5 * entries[0]["noise_multiplier"]
    delta = load_config("tiny", STUDY).privacy.delta
    for n, entry in enumerate(entries, 1):  # each line's epsilon covers all lines so far
        assert entry["epsilon"] == pytest.approx(epsilon(spent_segments(entries[:n]), delta))
    assert epsilon(spent_segments(entries), delta) <= MAX_EPSILON  # the site's own maximum


def test_an_append_never_cuts_a_line_another_process_is_writing(tmp_path):
    if not Path("/proc/locks").is_file():
        pytest.skip("needs /proc/locks to see the append wait on the ledger")
    ledger = tmp_path / LEDGER
    append_entry(ledger, ENTRY)
    line = (json.dumps(ENTRY | {"round": 2}, sort_keys=True) + "\n").encode()
    with open(ledger, "ab") as writer:  # another process, half-way through its append
        fcntl.flock(writer, fcntl.LOCK_EX)
        writer.write(line[:20])
        writer.flush()
        appender = threading.Thread(target=append_entry, args=(ledger, ENTRY | {"round": 3}))
        appender.start()
        wait_for(
            lambda: waits_on_a_lock(os.getpid()) or not appender.is_alive(),
            "the append to wait on the ledger, or to go ahead",
        )
        writer.write(line[20:])
        writer.flush()
    appender.join(DEADLINE_S)
    assert [e["round"] for e in read_ledger(ledger)] == [1, 2, 3]
