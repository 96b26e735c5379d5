"""A real `flwr run .`: 3 simulated phantom sites, 2 rounds, ledger and summary checked.

Runs against its own FLWR_HOME and its own local SuperLink ports (Flower's defaults,
39091/39093, would join any other local SuperLink on the machine, e.g. a study someone
runs), and stops, by pid, the local simulation SuperLink that `flwr run` starts (it
outlives the command). `flwr run` exits 0 even when the ServerApp
fails, so the run's status is read back with `flwr ls --run-id ID --format json`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_package import main_job_federation_config

from fedsynth.common.accountant import epsilon
from fedsynth.common.ledger import read_ledger, spent_segments

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SITES = ("site-1", "site-2", "site-3")
PORTS = "test-ports.json"  # in FLWR_HOME: the local SuperLink's API and control ports

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


def _flwr(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    api, control = json.loads((home / PORTS).read_text())
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(api),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    return subprocess.run(
        [str(BIN / "flwr"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _pids(home: Path, program: str = "") -> list[int]:
    """Pids of the processes whose environment names this FLWR_HOME (everything the local
    SuperLink started inherits it), only those running `program` when one is named."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"FLWR_HOME={home}".encode() in environ and (
            not program or any(program.encode() in part for part in cmdline[:2])
        ):
            pids.append(int(proc.name))
    return pids


def _superlink_pids(home: Path) -> list[int]:
    return _pids(home, "flower-superlink")


def _alive(pid: int) -> bool:
    """The process runs (a killed child its parent has not reaped yet is a zombie: not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _stop(pids: list[int], grace: float = 15.0) -> None:
    """SIGTERM the given pids, then SIGKILL whatever is left after `grace` seconds."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        pids = [pid for pid in pids if _alive(pid)]
        time.sleep(0.5)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _free_ports(n: int) -> list[int]:
    """n TCP ports on 127.0.0.1 that were free a moment ago."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def _flwr_home(tmp_path: Path) -> Path:
    """An FLWR_HOME of the test's own whose default SuperLink is a local simulation one on
    ports of its own."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / PORTS).write_text(json.dumps(_free_ports(2)))
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
    )
    return home


def _study_file(tmp_path: Path, secure: bool, rounds: int = 2) -> Path:
    study = tmp_path / "study.yaml"
    text = STUDY.replace("CACHE", str(tmp_path / "cache")).replace("SECURE", str(secure).lower())
    study.write_text(text.replace("rounds: 2", f"rounds: {rounds}"))
    return study


def _start_study(home: Path, overrides: str) -> str:
    """`flwr run .` with the README's federation config; returns the run id."""
    started = _flwr(
        home, "run", ".", "--federation-config", main_job_federation_config(), "-c", overrides
    )
    assert started.returncode == 0, started.stdout + started.stderr
    return re.search(r"started run (\d+)", started.stdout + started.stderr).group(1)


def _run_study(home: Path, overrides: str) -> str:
    """`flwr run .` with the README's federation config; waits for the end; the run's log."""
    run_id = _start_study(home, overrides)
    status = "running"
    deadline = time.monotonic() + 420
    while time.monotonic() < deadline:
        listed = _flwr(home, "ls", "--run-id", run_id, "--format", "json")
        [run] = json.loads(listed.stdout)["runs"]
        status = run["status"]
        if status.startswith("finished"):
            break
        time.sleep(3)
    log = _flwr(home, "log", run_id, "--show").stdout
    if status != "finished:completed":
        pytest.fail(f"run {run_id} ended {status}:\n{log[-4000:]}")
    return log


@pytest.mark.slow
@pytest.mark.parametrize("secure", [True, False], ids=["secagg+", "plain"])
def test_flwr_run_trains_two_rounds_with_a_ledger(tmp_path, secure):
    home, run_dir, study = _flwr_home(tmp_path), tmp_path / "run", _study_file(tmp_path, secure)
    overrides = f'config="{study}" run-dir="{run_dir}" phantom-subjects=6 privacy.target-epsilon=8'
    try:
        log = _run_study(home, overrides)
        if secure:
            assert "Secure aggregation completed" in log, log[-4000:]
        first = read_ledger(run_dir / "ledger.jsonl")
        summary = json.loads((run_dir / "summary.json").read_text())
        state = json.loads((run_dir / "state.json").read_text())
        if not secure:  # resume through the run config: one more round, ledger continued
            _run_study(home, overrides + " resume=true federation.rounds=3")
            resumed = read_ledger(run_dir / "ledger.jsonl")
            assert resumed[: len(first)] == first
            assert {e["round"] for e in resumed[len(first) :]} == {3}
            assert json.loads((run_dir / "summary.json").read_text())["rounds_done"] == 3
    finally:
        _stop(_superlink_pids(home))

    ledger = first
    assert sorted((e["round"], e["site"]) for e in ledger) == [
        (r, s) for r in (1, 2) for s in SITES
    ]
    assert [e["round"] for e in ledger] == sorted(e["round"] for e in ledger)
    assert all(e["status"] == "trained" and e["steps"] == 2 for e in ledger)
    assert all(e["noise_multiplier"] > 0 for e in ledger)
    assert all(e["sample_rate"] == pytest.approx(4 / 6) for e in ledger)  # batch 4 of 6
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

    spent = {"round": 1, "site": "site-1", "noise_multiplier": 0.5, "sample_rate": 0.5,
             "steps": 500, "delta": 1e-5, "epsilon": 99.0, "status": "trained",
             "study": "s1"}  # fmt: skip
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
