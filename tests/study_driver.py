"""Run a tiny study in one process (real ServerApp loop, real ClientApp sites over a
LoopbackGrid), optionally SIGKILLing itself at a chosen point: the resume tests' subject.

    python tests/study_driver.py RUN_DIR CHECKPOINT PHANTOMS SITE_STATES ROUNDS SECURE RESUME
        [KILL]

KILL is `server-ledger:N` (after the server's Nth ledger line is on disk), `site-ledger:N`
(after the Nth line any site wrote to its own ledger, i.e. mid-round, before the server
heard of it) or `checkpoint:R` (after round R's checkpoint, before its summary). Killing
this process kills the server and the sites together, as kill -9 of a `flwr run`
simulation does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from flwr.app import Context, RecordDict

import fedsynth.client.budget as budget
import fedsynth.server.privacy_ledger as privacy_ledger
import fedsynth.server.server_app as server_app
import fedsynth.server.strategy as strategy
from fedsynth.client.client_app import app
from fedsynth.common.logs import show_on_console
from fedsynth.server.run_dir import ledger_table
from fedsynth.server.study import prepare
from fedsynth.simulations.loopback import LoopbackGrid, task_identity

SITES = 3


def drive(
    tmp: Path,
    checkpoint: Path,
    phantoms: Path,
    rounds: int,
    secure: bool,
    resume: bool,
    kill: str = "",
) -> subprocess.CompletedProcess:
    """Run this driver in a fresh process: run dir tmp/run, site states tmp/states."""
    args = [
        sys.executable,
        __file__,
        str(tmp / "run"),
        str(checkpoint),
        str(phantoms),
        str(tmp / "states"),
        str(rounds),
        str(secure).lower(),
        str(resume).lower(),
    ]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    if os.environ.get("PYTHONPATH"):  # the package the tests import, not another copy
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return subprocess.run(
        [*args, *([kill] if kill else [])], capture_output=True, text=True, env=env, timeout=600
    )


def _kill_after(module, name: str, when) -> None:
    """Wrap module.name so that the process is SIGKILLed right after the call `when` picks."""
    original = getattr(module, name)
    calls = 0

    def wrapped(*args, **kwargs):
        nonlocal calls
        result = original(*args, **kwargs)
        calls += 1
        if when(calls, args):
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(module, name, wrapped)


def main(argv: list[str]) -> None:
    run_dir, checkpoint, phantoms, states, rounds, secure, resume = argv[:7]
    kill = argv[7] if len(argv) > 7 else ""
    torch.set_num_threads(1)
    show_on_console()  # as the ServerApp does: fedsynth's lines on stderr
    if kill:
        where, n = kill.split(":")
        n = int(n)
        if where == "server-ledger":
            _kill_after(privacy_ledger, "append_entry", lambda calls, _: calls == n)
        elif where == "site-ledger":
            _kill_after(budget, "append_entry", lambda calls, _: calls == n)
        elif where == "checkpoint":
            _kill_after(strategy, "save_round", lambda _, args: args[1] == n)
        else:
            raise SystemExit(f"unknown kill point {kill}")
    run_config = {
        "config": "tiny",
        "run-dir": run_dir,
        "resume": resume == "true",
        "checkpoint": checkpoint,
        "secagg-max-weight": 10,
        "federation.rounds": int(rounds),
        "federation.sites": SITES,
        "federation.sites-per-round": SITES,
        "federation.secure-aggregation": secure == "true",
    }
    nodes = {
        k: {
            "data-path": f"{phantoms}/site-{k}",
            "state-dir": f"{states}/site-{k}",
            "max-epsilon": 10.0,
            "require-secure-aggregation": secure == "true",
            "site-name": f"site-{k}",
        }
        for k in range(1, SITES + 1)
    }
    study = prepare(run_config)
    with task_identity():
        summary = server_app.run_federation(
            LoopbackGrid(app, nodes), study, Context(1, 0, {}, RecordDict(), {})
        )
    print(ledger_table(summary), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main(sys.argv[1:])
