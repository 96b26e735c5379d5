"""A study killed with SIGKILL at any point resumes from its run folder: same rounds, the
ledger continued, no spend lost or counted twice, the same final epsilon.

The study (real ServerApp loop and real ClientApp sites in one process, tests/study_driver.py)
is killed where a crash hurts most: mid-round after a site recorded its spend but before
the server heard of it; after the server's ledger lines but before the round's checkpoint;
after the checkpoint but before the summary.
"""

from __future__ import annotations

import json
import signal
from collections import Counter
from pathlib import Path

import pytest
from study_driver import drive

from fedsynth.common.ledger import charged, read_ledger

ROUNDS = 3
SITES = ("site-1", "site-2", "site-3")


def _drive(tmp: Path, checkpoint: Path, phantoms: Path, secure: bool, resume: bool, kill=""):
    return drive(tmp, checkpoint, phantoms, ROUNDS, secure, resume, kill)


def _charged(entries: list[dict], site: str) -> Counter:
    """(round, sigma, rate, steps) of every line that counts toward a site's epsilon."""
    return Counter(
        (e["round"], e["noise_multiplier"], e["sample_rate"], e["steps"])
        for e in charged(entries, site)
    )


def _finish(tmp: Path) -> dict:
    run = tmp / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds_done"] == ROUNDS and summary["ended_early"] is None
    assert json.loads((run / "state.json").read_text())["rounds_done"] == ROUNDS
    assert (run / "rounds" / f"round-{ROUNDS:03d}" / "unet.pt").is_file()
    server = read_ledger(run / "ledger.jsonl")
    for site in SITES:
        own = read_ledger(tmp / "states" / site / "ledger.jsonl")
        # every round the site trained (its own ledger, written before its update left
        # it) is charged by the server exactly once: nothing lost, nothing twice
        assert _charged(server, site) == _charged(own, site), site
        # and the server's recomputed total agrees with the site's own
        assert summary["site_epsilon"][site] == pytest.approx(own[-1]["epsilon"], rel=1e-9)
    return summary


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_checkpoint, site_phantoms) -> dict:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    done = _drive(tmp, tiny_checkpoint, site_phantoms, False, False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return _finish(tmp)


@pytest.mark.parametrize(
    ("kill", "secure"),
    [
        ("site-ledger:4", False),  # round 2: site-1 trained and recorded, server never heard
        ("server-ledger:3", True),  # round 1 in the server ledger, no checkpoint yet
        ("checkpoint:2", False),  # round 2 saved, summary not yet written
    ],
)
def test_a_killed_study_resumes_without_losing_or_double_counting_spend(
    tmp_path, tiny_checkpoint, site_phantoms, uninterrupted, kill, secure
):
    killed = _drive(tmp_path, tiny_checkpoint, site_phantoms, secure, False, kill)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    before = read_ledger(tmp_path / "run" / "ledger.jsonl")
    _check_write_order(tmp_path / "run", before, kill)
    resumed = _drive(tmp_path, tiny_checkpoint, site_phantoms, secure, True)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    after = read_ledger(tmp_path / "run" / "ledger.jsonl")
    assert after[: len(before)] == before  # continued, never rewritten
    # each site's own epsilon, reported with every reply, agrees with the server's ledger
    assert "[fedsynth] warning" not in resumed.stderr
    summary = _finish(tmp_path)
    for site in SITES:
        # each site plans on what it has spent, so even a round trained twice lands the
        # study on the target: the same final epsilon as the uninterrupted run
        want = uninterrupted["site_epsilon"][site]
        assert summary["site_epsilon"][site] == pytest.approx(want, rel=0.01)
        assert summary["site_epsilon"][site] <= summary["target_epsilon"]
    if kill.startswith("site-ledger"):
        assert "charged 1 round(s) from its own ledger" in resumed.stderr
        assert any(e.get("reported_by_site") for e in after)


def _check_write_order(run: Path, ledger: list[dict], kill: str) -> None:
    """At the kill point the ledger is ahead of the checkpoint, never behind (issue 16,
    item 3: resume's reconcile would hide a checkpoint written before its ledger lines)."""
    state = run / "state.json"
    saved = json.loads(state.read_text())["rounds_done"] if state.is_file() else 0
    where, n = kill.split(":")
    if where == "checkpoint":  # killed right after round n's checkpoint
        assert saved == int(n)
    if where == "server-ledger":  # killed right after the server's nth line: no checkpoint
        assert saved < max(e["round"] for e in ledger)
    for r in range(1, saved + 1):  # every saved round has its lines for every site
        assert {e["site"] for e in ledger if e["round"] == r} == set(SITES), r


def test_a_finished_study_refuses_to_start_again_without_resume(
    tmp_path, tiny_checkpoint, site_phantoms
):
    first = _drive(tmp_path, tiny_checkpoint, site_phantoms, False, False, "checkpoint:1")
    assert first.returncode == -signal.SIGKILL
    again = _drive(tmp_path, tiny_checkpoint, site_phantoms, False, False)
    assert again.returncode != 0
    assert "already holds a study" in again.stdout + again.stderr


def test_a_plain_study_is_not_resumed_under_secure_aggregation(
    tmp_path, tiny_checkpoint, site_phantoms
):
    """Its statement would claim SecAgg+ for rounds that ran plain: the resume is refused
    before anything runs (the study's terms fix secure aggregation), nothing is written."""
    first = _drive(tmp_path, tiny_checkpoint, site_phantoms, False, False, "checkpoint:1")
    assert first.returncode == -signal.SIGKILL
    run = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in (run / "ledger.jsonl", run / "state.json")}
    resumed = _drive(tmp_path, tiny_checkpoint, site_phantoms, True, True)
    assert resumed.returncode != 0
    assert (
        "FedsynthError: " + str(run) + ": this study's federation.secure-aggregation is False, "
        "fixed when it started; the resume asks for True. Its privacy statement says which "
        "rounds ran under SecAgg+: resume with the same value, or start a new study"
    ) in resumed.stderr
    assert {p.name: p.read_bytes() for p in (run / "ledger.jsonl", run / "state.json")} == before
    assert not (run / "rounds" / "round-002").exists()
