"""A real `flwr run .` whose simulation process is SIGKILLed mid-round, then resumed.

The other kill tests (tests/test_resume.py) kill a study that runs in one process over
the loopback grid. This one kills the `flwr-simulation` process the local SuperLink
started (ServerApp and simulated sites together, as a crashed server machine would lose
them) in round 2, after at least one site recorded round 2 in its own ledger and before
the server wrote any round-2 line, stops what is left of that Flower (SuperLink, Ray),
and resumes with `-c 'resume=true run-dir=...'` on a fresh SuperLink. The server's ledger
is then checked against each site's own (run-dir/sites/site-N/ledger.jsonl).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from test_flower_simulation import SITES, _flower, _run_study, _study_file
from test_package import main_job_federation_config

from fedsynth.common.accountant import epsilon
from fedsynth.common.config import load_config
from fedsynth.common.ledger import read_ledger, segment_of, spending
from fedsynth.server.privacy_ledger import charged, charged_epsilon
from fedsynth.simulations.local_flwr import LocalFlower, alive

ROUNDS = 3
KILL_ROUND = 2
WAIT_S = 480


def _lines(path: Path) -> list[dict]:
    """The whole JSON lines of a ledger another process may be appending to right now."""
    out = []
    try:
        text = path.read_text()
    except FileNotFoundError:
        return out
    for line in text.splitlines(keepends=True):
        if line.endswith("\n"):
            out.append(json.loads(line))
    return out


def _rounds_done(run_dir: Path) -> int:
    state = run_dir / "state.json"
    return json.loads(state.read_text())["rounds_done"] if state.is_file() else 0


def _mid_round(run_dir: Path) -> bool:
    """Round KILL_ROUND is under way: some site has recorded it in its own ledger, the
    server has written none of its lines and saved round KILL_ROUND - 1 only."""
    server = _lines(run_dir / "ledger.jsonl")
    if {e["round"] for e in server} != set(range(1, KILL_ROUND)):
        return False
    if _rounds_done(run_dir) != KILL_ROUND - 1:
        return False
    return any(
        e["round"] == KILL_ROUND
        for site in SITES
        for e in _lines(run_dir / "sites" / site / "ledger.jsonl")
    )


def _simulation_pid(flower: LocalFlower) -> int:
    [pid] = flower.pids("flwr-simulation")
    return pid


def _kill_mid_round(flower: LocalFlower, run_dir: Path, run_id: str) -> None:
    """Poll the run dir; SIGKILL the simulation process once round KILL_ROUND is under way."""
    deadline = time.monotonic() + WAIT_S
    started = False
    while not _mid_round(run_dir):
        running = bool(flower.pids("flwr-simulation"))
        started = started or running
        if time.monotonic() > deadline or (started and not running):
            log = flower.flwr("log", run_id, "--show").stdout
            pytest.fail(f"never saw round {KILL_ROUND} under way:\n{log[-4000:]}")
        time.sleep(0.05)
    pid = _simulation_pid(flower)
    os.kill(pid, signal.SIGKILL)
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _own(run_dir: Path, site: str) -> list[dict]:
    return read_ledger(run_dir / "sites" / site / "ledger.jsonl")


def _counted(entries: list[dict]) -> Counter:
    return Counter(
        (e["round"], e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries
    )


@pytest.mark.slow
def test_a_killed_flwr_simulation_resumes_with_every_site_round_charged_once(tmp_path):
    flower, run_dir = _flower(tmp_path), tmp_path / "run"
    study = _study_file(tmp_path, secure=True, rounds=ROUNDS)
    overrides = f'config="{study}" run-dir="{run_dir}" phantom-subjects=6 privacy.target-epsilon=8'
    try:
        run_id = flower.start(overrides, main_job_federation_config())
        _kill_mid_round(flower, run_dir, run_id)
        # what the crash left: the server's ledger ends at round 1, a site spent round 2
        before = read_ledger(run_dir / "ledger.jsonl")
        assert {e["round"] for e in before} == set(range(1, KILL_ROUND))
        assert _rounds_done(run_dir) == KILL_ROUND - 1
        assert not (run_dir / "rounds" / f"round-{KILL_ROUND:03d}" / "unet.pt").exists()
        flower.stop()  # the SuperLink and Ray's processes the killed one left behind
        unheard = {
            site: [e for e in _own(run_dir, site) if e["round"] == KILL_ROUND] for site in SITES
        }
        assert any(unheard.values()), "no site had recorded the killed round"
        log = _run_study(flower, overrides + " resume=true")
    finally:
        flower.stop()

    after = read_ledger(run_dir / "ledger.jsonl")
    assert after[: len(before)] == before  # only appended
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_done"] == ROUNDS and summary["ended_early"] is None
    privacy = load_config(str(study), {"privacy.target-epsilon": 8}).privacy
    for site in SITES:
        own = _own(run_dir, site)
        # every round the site recorded (the killed attempt and the retried one included)
        # is charged by the server exactly once, and nothing else is
        assert _counted(charged(after, site)) == _counted(spending(own, site)), site
        if unheard[site]:  # charged from the site's own report after the resume
            assert any(
                e["site"] == site and e["round"] == KILL_ROUND and e.get("reported_by_site")
                for e in after
            )
        ours = charged_epsilon(after, site, privacy)
        theirs = epsilon([segment_of(e) for e in spending(own, site)], privacy.delta)
        assert ours >= theirs * (1 - 1e-12), (site, ours, theirs)
        assert summary["site_epsilon"][site] == pytest.approx(ours, rel=1e-9)
        assert theirs <= summary["target_epsilon"] * (1 + 1e-6)
    assert "charged 1 round(s) from its own ledger" in log
