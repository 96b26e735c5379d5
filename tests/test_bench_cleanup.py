"""A bench stopped from outside stops what it started (simulations/local_flwr.py).

Flower starts its SuperLink detached, in a session of its own, and the SuperLink starts
SuperExec and `flwr-simulation` in another: a bench killed by `timeout` used to leave
them at full CPU for half an hour. Each test here starts a real parent process that
starts real children (a local SuperLink on 127.0.0.1 with runtime dependency
installation off, its SuperExec, the simulation, a spawned measuring process), signals
only the parent, and checks that every child is gone within seconds. Whatever a test
finds still running at its end is killed by pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fedsynth.simulations.local_flwr import alive, stop

CLI = [sys.executable, "-m", "fedsynth.common.cli", "bench"]
GONE_S = 10.0  # seconds from the signal until the parent and its children are all gone
START_S = 240.0  # seconds a real bench may take to start what a test waits for


def _environ(tmp_path: Path) -> dict[str, str]:
    """The child's environment: its temporary folders (and so every Flower home a bench
    makes) under tmp_path, one thread, no dependency installation at run time."""
    return {
        **os.environ,
        "TMPDIR": str(tmp_path),
        "OMP_NUM_THREADS": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }


def _under(tmp_path: Path) -> list[int]:
    """Running processes whose FLWR_HOME lies under tmp_path (all a LocalFlower started)."""
    found = []
    prefix = f"FLWR_HOME={tmp_path}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(entry.startswith(prefix) for entry in environ) and alive(int(proc.name)):
            found.append(int(proc.name))
    return found


def _children(pid: int) -> list[int]:
    """The running descendants of `pid`."""
    parents: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            parents[int(proc.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [child for child, p in parents.items() if p == parent]
        out += kids
        todo += kids
    return [child for child in out if alive(child)]


def _program(pid: int) -> str:
    """Its command line, arguments joined by spaces ("" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _running(tmp_path: Path, program: str) -> list[int]:
    """Running processes of `program` (the interpreter's script or the executable) whose
    FLWR_HOME lies under tmp_path."""
    return [pid for pid in _under(tmp_path) if program in " ".join(_program(pid).split()[:2])]


def _wait_for(found, what: str, parent: subprocess.Popen, log: Path) -> list[int]:
    """Poll found() until it returns a non-empty list; fail if the parent ends first."""
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        pids = found()
        if pids:
            return pids
        if parent.poll() is not None:
            pytest.fail(f"the parent ended ({parent.returncode}) before {what}:\n{log.read_text()}")
        time.sleep(0.1)
    pytest.fail(f"no {what} within {START_S} s:\n{log.read_text()}")


def _gone(pids: set[int], wait: float = GONE_S) -> list[int]:
    """Wait up to `wait` seconds for every pid to end; the ones still running."""
    deadline = time.monotonic() + wait
    left = [pid for pid in pids if alive(pid)]
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [pid for pid in left if alive(pid)]
    return left


def _end(parent: subprocess.Popen, tmp_path: Path, *others: int) -> None:
    """Kill by pid whatever a test left running (a failed test's leftovers)."""
    if parent.poll() is None:
        parent.kill()
        parent.wait()
    leftovers = [pid for pid in {*_under(tmp_path), *others} if alive(pid)]
    if leftovers:
        stop(leftovers, grace=0)


@pytest.mark.parametrize(
    ("sig", "status", "said"),
    [
        (signal.SIGTERM, 128 + signal.SIGTERM, "fedsynth bench: stopped by SIGTERM"),
        (signal.SIGINT, 130, "fedsynth bench: interrupted"),
    ],
)
def test_a_stopped_bench_stops_its_superlink_and_simulation(tmp_path, sig, status, said):
    """`fedsynth bench` in the middle of a real `flwr run .` (its SuperLink, SuperExec and
    `flwr-simulation` running), SIGTERM (as `kill PID` or `timeout` sends it) or SIGINT
    (Ctrl-C) to the bench alone: the bench exits non-zero (128 + SIGTERM; the CLI's 130
    for an interrupt), and it and all those processes are gone within GONE_S."""
    log = tmp_path / "bench.log"
    command = [*CLI, "--config", "tiny", "--only", "round_overhead_flwr_plain"]
    with log.open("w") as out:
        parent = subprocess.Popen(
            [*command, "--site-subjects", "6", "--json"],
            env=_environ(tmp_path),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so that nothing but the test signals it
        )
    try:
        _wait_for(lambda: _running(tmp_path, "flwr-simulation"), "simulation", parent, log)
        started = set(_under(tmp_path)) | set(_children(parent.pid))
        programs = " ".join(_program(pid) for pid in started)
        assert "flower-superlink" in programs and "flwr-simulation" in programs, programs
        os.kill(parent.pid, sig)
        left = [(p, _program(p)) for p in _gone({parent.pid} | started | set(_under(tmp_path)))]
        ended = parent.wait(timeout=60)
        assert left == []
        assert ended == status, log.read_text()
        assert log.read_text().strip().splitlines()[-1] == said
    finally:
        _end(parent, tmp_path)


def test_a_bench_stopped_while_a_spawned_process_measures_stops_it(tmp_path):
    """The peak-memory keys measure in a spawned process (bench.in_own_process); SIGTERM
    to the bench while it runs takes that process down too (the signal reaches only the
    bench: no terminal, no process group kill). The default config's site round takes
    longer than the test waits, so the process must be killed, not left to finish."""
    log = tmp_path / "bench.log"
    with log.open("w") as out:
        parent = subprocess.Popen(
            [*CLI, "--only", "site_peak_memory_mb", "--json"],  # the default: a round of 10+ s
            env=_environ(tmp_path),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so that nothing but the test signals it
        )
    spawned: list[int] = []
    try:
        spawned = _wait_for(
            lambda: [p for p in _children(parent.pid) if "spawn_main" in _program(p)],
            "spawned measuring process",
            parent,
            log,
        )
        os.kill(parent.pid, signal.SIGTERM)
        # killed, not left to finish its round (which takes longer than this)
        left = [(pid, _program(pid)) for pid in _gone({parent.pid, *spawned}, 5.0)]
        ended = parent.wait(timeout=60)
        assert left == []
        assert ended == 128 + signal.SIGTERM, log.read_text()
    finally:
        _end(parent, tmp_path, *spawned)


PARENT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path

    from fedsynth.simulations.local_flwr import LocalFlower, stopped_on_exit

    how = sys.argv[2]
    with stopped_on_exit():
        flower = LocalFlower(Path(sys.argv[1]) / "flwr-home")
        listed = flower.flwr("ls", "--format", "json")  # starts the local SuperLink
        assert listed.returncode == 0, listed.stderr

        def programs():
            found = []
            for pid in flower.pids():
                try:
                    found.append(Path(f"/proc/{pid}/cmdline").read_bytes().decode())
                except OSError:
                    pass
            return " ".join(found)

        deadline = time.monotonic() + 30  # the SuperLink starts its SuperExec after answering
        while "flower-superexec" not in programs() and time.monotonic() < deadline:
            time.sleep(0.2)
        print(" ".join(map(str, flower.pids())), flush=True)
        sys.stdin.readline()  # the test has seen the processes: leaving now stops them
        if how == "exception":
            raise RuntimeError("a failed measurement")
        if how == "signal":
            time.sleep(600)
    """
)


@pytest.mark.parametrize(
    ("how", "sig", "status"),
    [
        ("return", None, 0),
        ("exception", None, 1),
        ("signal", signal.SIGTERM, 128 + signal.SIGTERM),
        # a KeyboardInterrupt out of a script: Python ends by SIGINT (the shell's 130)
        ("signal", signal.SIGINT, -signal.SIGINT),
        ("signal", signal.SIGHUP, 128 + signal.SIGHUP),
    ],
)
def test_every_way_out_of_stopped_on_exit_stops_the_superlink(tmp_path, how, sig, status):
    """A real local SuperLink (and its SuperExec), started by `flwr ls` in a process of
    its own, is gone within GONE_S of that process leaving `stopped_on_exit` by a return,
    an exception or a signal sent to it alone."""
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), how],
        env=_environ(tmp_path),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    started: set[int] = set()
    try:
        assert parent.stdout is not None and parent.stdin is not None
        started = {int(pid) for pid in parent.stdout.readline().split()}
        programs = " ".join(_program(pid) for pid in started)
        assert "flower-superlink" in programs and "flower-superexec" in programs, (
            programs,
            parent.stderr.read() if parent.poll() is not None and parent.stderr else "",
        )
        parent.stdin.write("seen\n")  # the parent waits for this before it leaves or sleeps
        parent.stdin.flush()
        if sig is not None:
            os.kill(parent.pid, sig)
        left = [(p, _program(p)) for p in _gone({parent.pid} | started | set(_under(tmp_path)))]
        ended = parent.wait(timeout=60)
        assert left == []
        assert ended == status
    finally:
        _end(parent, tmp_path, *started)
