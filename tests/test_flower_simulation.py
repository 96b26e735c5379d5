"""A real `flwr run .`: 3 simulated phantom sites, 2 rounds, ledger and summary checked.

Runs against its own FLWR_HOME and its own local SuperLink ports (Flower's defaults,
39091/39093, would join any other local SuperLink on the machine, e.g. a study someone
runs), and stops, by pid, the local simulation SuperLink that `flwr run` starts (it
outlives the command): simulations/local_flwr.py, which `fedsynth bench` uses too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from test_package import main_job_federation_config

from fedsynth.common.accountant import epsilon
from fedsynth.common.errors import FedsynthError
from fedsynth.common.ledger import read_ledger, spent_segments
from fedsynth.simulations.local_flwr import LocalFlower, stop

ROOT = Path(__file__).resolve().parents[1]
SITES = ("site-1", "site-2", "site-3")
RUN_TIMEOUT_S = 420

STUDY = """\
base: tiny
device: cpu
autoencoder: {steps: 5}
training: {pretrain-steps: 5, segmenter-steps: 4}
diffusion: {train-timesteps: 12}
sampling: {steps: 3}
federation: {rounds: 2, sites: 3, sites-per-round: 3, secure-aggregation: SECURE}
paths: {cache-dir: CACHE}
"""


def _flower(tmp_path: Path) -> LocalFlower:
    """A Flower home of the test's own whose default SuperLink is a local simulation one
    on free ports of its own (simulations/local_flwr.py)."""
    return LocalFlower(tmp_path / "flwr-home", ROOT, threads=1)


def _study_file(tmp_path: Path, secure: bool, rounds: int = 2) -> Path:
    study = tmp_path / "study.yaml"
    text = STUDY.replace("CACHE", str(tmp_path / "cache")).replace("SECURE", str(secure).lower())
    study.write_text(text.replace("rounds: 2", f"rounds: {rounds}"))
    return study


def _run_study(flower: LocalFlower, overrides: str) -> str:
    """`flwr run .` with the README's federation config; waits for the end; the run's log."""
    try:
        return flower.run(overrides, RUN_TIMEOUT_S, main_job_federation_config())
    except FedsynthError as error:
        pytest.fail(str(error))


@pytest.mark.slow
@pytest.mark.parametrize("secure", [True, False], ids=["secagg+", "plain"])
def test_flwr_run_trains_two_rounds_with_a_ledger(tmp_path, secure):
    flower, run_dir, study = _flower(tmp_path), tmp_path / "run", _study_file(tmp_path, secure)
    overrides = f'config="{study}" run-dir="{run_dir}" phantom-subjects=6 privacy.target-epsilon=8'
    try:
        log = _run_study(flower, overrides)
        if secure:
            assert "Secure aggregation completed" in log, log[-4000:]
        # what the quick start shows: fedsynth's log, forwarded by Flower from the ServerApp
        for line in (
            "[fedsynth] run dir ",
            "[fedsynth] round 0 (public checkpoint): validation loss ",
            "[fedsynth] round 2/2: 3 trained, 0 no valid reply; epsilon site-1 ",
            "[fedsynth] round 2 validation: validation loss ",
            "privacy ledger (rdp, delta 1e-05, target epsilon 8",
            f"[fedsynth] study done: 2 of 2 rounds; run dir {run_dir}; summary ",
        ):
            assert line in log, (line, log[-4000:])
        first = read_ledger(run_dir / "ledger.jsonl")
        summary = json.loads((run_dir / "summary.json").read_text())
        state = json.loads((run_dir / "state.json").read_text())
        if not secure:  # resume through the run config: one more round, ledger continued
            _run_study(flower, overrides + " resume=true federation.rounds=3")
            resumed = read_ledger(run_dir / "ledger.jsonl")
            assert resumed[: len(first)] == first
            assert {e["round"] for e in resumed[len(first) :]} == {3}
            assert json.loads((run_dir / "summary.json").read_text())["rounds_done"] == 3
    finally:
        stop(flower.pids("flower-superlink"))

    ledger = first
    assert sorted((e["round"], e["site"]) for e in ledger) == [
        (r, s) for r in (1, 2) for s in SITES
    ]
    assert [e["round"] for e in ledger] == sorted(e["round"] for e in ledger)
    assert all(e["status"] == "trained" and e["steps"] == 2 for e in ledger)
    assert all(e["noise_multiplier"] > 0 for e in ledger)
    # 6 subjects are published as 1 (a simulated node cannot opt in): batch 4 of 1, i.e. 1
    assert all(e["sample_rate"] == 1.0 for e in ledger)
    assert summary["target_epsilon"] == 8.0  # the -c override reached the study
    assert summary["rounds_done"] == 2 and summary["secure_aggregation"] is secure
    assert summary["delta"] == 1e-5 and summary["accountant"] == "rdp"
    for site in SITES:
        # anyone can recompute each site's spend from the ledger's numbers
        mine = [e for e in ledger if e["site"] == site]
        for k, entry in enumerate(mine, 1):
            assert entry["epsilon"] == pytest.approx(epsilon(spent_segments(mine[:k]), 1e-5))
        assert summary["site_epsilon"][site] == pytest.approx(mine[-1]["epsilon"])
        # planned to land on the target at the last round: on it, never above it
        target = summary["target_epsilon"]
        assert 0.99 * target <= mine[-1]["epsilon"] <= target * (1 + 1e-6)
        # the site's own ledger agrees with the server's
        own = read_ledger(run_dir / "sites" / site / "ledger.jsonl")[: len(mine)]
        assert [e["noise_multiplier"] for e in own] == [e["noise_multiplier"] for e in mine]
    assert (run_dir / "rounds" / "round-002" / "unet.pt").is_file()
    assert state["rounds_done"] == 2
    # validated each round on public held-out phantoms: a loss and a montage
    assert sorted(summary["validation_loss"]) == ["0", "1", "2"]  # 0: the public checkpoint
    assert all(math.isfinite(v) for v in summary["validation_loss"].values())
    for r in (1, 2):
        assert (run_dir / "validation" / f"round-00{r}.png").stat().st_size > 10_000
    assert summary["montage"] == str(run_dir / "validation" / "round-002.png")
    if secure:  # the study, released: privacy.json is the ledger recomputed
        from fedsynth.common.privacy_verify import verify_release
        from fedsynth.server.release import release

        out = tmp_path / "release"
        release(run_dir, 2, out, show_progress=False)
        statement = json.loads((out / "privacy.json").read_text())
        for site in SITES:
            mine = [e for e in ledger if e["site"] == site]
            assert statement["sites"][site]["epsilon"] == pytest.approx(
                epsilon(spent_segments(mine), 1e-5)
            )
        assert verify_release(out).keys() == set(SITES)
        assert len(list((out / "cohort").glob("*.nii.gz"))) == 2
        assert (out / "report.html").stat().st_size > 50_000


def test_a_spent_site_refuses_without_reading_data(tmp_path):
    """READY says so before the round, and a round sent anyway stops before any data is
    read (the phantom and checkpoint folders do not exist): nothing is sent, no zero
    update joins a secure sum."""
    import torch

    from fedsynth.client.client_app import ready_answer, site_round_reply
    from fedsynth.common.config import load_config, to_dict
    from fedsynth.common.ledger import append_entry
    from fedsynth.common.protocol import SiteStop

    spent = {
        "round": 1,
        "site": "site-1",
        "noise_multiplier": 0.5,
        "sample_rate": 0.5,
        "steps": 500,
        "delta": 1e-5,
        "epsilon": 99.0,
        "status": "trained",
        "study": "s1",
    }
    append_entry(tmp_path / "sites" / "site-1" / "ledger.jsonl", spent)
    sent = {
        "round": 2,
        "study": json.dumps(to_dict(load_config("tiny"))),
        "study-id": "s1",
        "checkpoint": str(tmp_path / "no-checkpoint"),
        "phantoms": str(tmp_path / "no-phantoms"),
        "site-states": str(tmp_path / "sites"),
        "clipping-range": 4.0,
    }
    answer = ready_answer(sent, {"partition-id": 0})
    assert (answer["ready"], answer["code"], answer["site"]) == (0, "budget-spent", "site-1")
    assert answer["epsilon"] == pytest.approx(epsilon(spent_segments([spent]), 1e-5))
    assert json.loads(answer["history"]) == [[1, 0.5, 0.5, 500]]
    weights = {"w": torch.ones(3, 2), "count": torch.tensor(7)}
    with pytest.raises(SiteStop, match=r"^fedsynth:budget-spent: "):
        site_round_reply(weights, sent, {"partition-id": 0}, secure=True)
