"""A real `flwr run .` on this machine, in a Flower home of its own, stopped by pid.

`flwr run .` starts a local simulation SuperLink that outlives the command; on Flower's
default ports it would join any other local SuperLink (a study someone else runs). A
`LocalFlower` gives each use its own FLWR_HOME, whose default SuperLink is a local
simulation one on free 127.0.0.1 ports, with runtime dependency installation off, and
stops, by pid, every process that inherited that FLWR_HOME (SuperLink, simulation, Ray).
`flwr run` exits 0 even when the ServerApp fails, so a run's end and status are read
back with `flwr ls --run-id ID --format json`.

Stopping on every exit path. Flower starts its SuperLink detached, in a session of its
own (and the SuperLink its SuperExec, which starts `flwr-simulation`, in another), so
neither a terminal's Ctrl-C nor `timeout`'s signal to the command's process group
reaches them, and nothing stops them when the command that made them dies: a bench
stopped from outside left its SuperLink and simulation at full CPU for half an hour.
So: each `flwr` command runs in a session of its own, and its process group is killed if
the call is left early; every LocalFlower's home is registered, and `stop_all` stops
every process (and the process group it leads) that inherited one of those homes;
`stopped_on_exit` makes SIGTERM, SIGINT and SIGHUP raise in the main thread (so every
`finally` runs: temporary folders, spawned measuring processes) and calls `stop_all`
however its block is left; `stop_all` also runs at interpreter exit. Only a SIGKILL of
the command itself still leaves them behind.

Used by `fedsynth bench` (the round overhead of a real run) and the slow tests.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from fedsynth.common.errors import FedsynthError

# the README's quick start: three simulated sites sharing the machine, one core each
QUICK_START_FEDERATION = "num-supernodes=3 client-resources-num-cpus=1"
APP_DIR = Path(__file__).resolve().parents[1]  # the Flower app: the folder of pyproject.toml


def free_ports(n: int) -> list[int]:
    """n TCP ports on 127.0.0.1 that were free a moment ago."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def alive(pid: int) -> bool:
    """The process runs (a killed child its parent has not reaped yet is a zombie: not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _group_of(pid: int) -> int | None:
    """The process group of `pid` (None once it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return None


def _signal(pid: int, sig: int) -> None:
    """`sig` to `pid`, and to the process group it leads (a group of its own: Flower's
    detached SuperLink and SuperExec lead theirs), never to this process's own group."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if _group_of(pid) == pid and pid != os.getpgrp():
            os.killpg(pid, sig)
        os.kill(pid, sig)


def stop(pids: list[int], grace: float = 15.0) -> None:
    """SIGTERM the given pids (and the process groups they lead), then SIGKILL whatever
    is left after `grace` seconds."""
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        pids = [pid for pid in pids if alive(pid)]
        if pids:
            time.sleep(0.1)
    for pid in pids:
        _signal(pid, signal.SIGKILL)


_HOMES: set[Path] = set()  # every LocalFlower's home in this process (`stop_all`)


def marked(homes: set[Path] | list[Path], program: str = "") -> list[int]:
    """Pids of the processes other than this one whose environment names one of these
    FLWR_HOMEs (everything a local SuperLink started inherits it), only those running
    `program` if named."""
    markers = {f"FLWR_HOME={home}".encode() for home in homes}
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if markers.intersection(environ) and (
            not program or any(program.encode() in part for part in cmdline[:2])
        ):
            pids.append(int(proc.name))
    return pids


def stop_all(grace: float = 15.0) -> None:
    """Stop everything every LocalFlower of this process started (by pid, see `stop`)."""
    if _HOMES:
        stop(marked(_HOMES), grace)


atexit.register(stop_all)


STOP_GRACE_S = 5.0  # seconds a stopped command gives its SuperLink and simulation


class Stopped(SystemExit):
    """Raised in the main thread by SIGTERM or SIGHUP within `stopped_on_exit`: the
    command was told to stop; its exit status is 128 + the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


def _raise_stopped(signum: int, _frame: FrameType | None) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt  # as Python's own handler: the CLI says "interrupted", 130
    raise Stopped(signum)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@contextlib.contextmanager
def stopped_on_exit(grace: float = STOP_GRACE_S) -> Iterator[None]:
    """Within the block (in the main thread): SIGTERM and SIGHUP raise `Stopped`, SIGINT
    KeyboardInterrupt, so the code in it unwinds through its `finally`s; however the block
    is left (return, exception, signal), every LocalFlower of this process is stopped
    (`stop_all`, `grace` seconds before SIGKILL), with those signals ignored meanwhile so
    a second one does not cut the cleanup short. Outside the main thread only the
    cleanup applies (Python delivers signals to the main thread)."""
    previous: dict[signal.Signals, Any] = {}  # what each signal did before
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            previous[sig] = signal.signal(sig, _raise_stopped)
    try:
        yield
    finally:
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        try:
            stop_all(grace)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class LocalFlower:
    """A Flower home under `home` (created) for `flwr run` of the app in `app_dir`."""

    def __init__(self, home: Path, app_dir: Path = APP_DIR, threads: int | None = None) -> None:
        """`threads`: OMP_NUM_THREADS for everything the run starts (None: as the caller's
        environment has it, as in the quick start)."""
        if not (app_dir / "pyproject.toml").is_file():
            raise FedsynthError(
                f"{app_dir} has no pyproject.toml: a real `flwr run .` needs fedsynth's source "
                "folder (an editable install, as in the README)"
            )
        self.home, self.app_dir, self.threads = Path(home), Path(app_dir), threads
        self.api_port, self.control_port = free_ports(2)  # the local SuperLink's
        self.home.mkdir(parents=True, exist_ok=True)
        _HOMES.add(self.home)
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
        )

    def env(self) -> dict[str, str]:
        bin_dir = Path(sys.executable).parent
        env = {
            **os.environ,
            "FLWR_HOME": str(self.home),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(self.api_port),
            "FLWR_LOCAL_CONTROL_API_PORT": str(self.control_port),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        }
        if self.threads is not None:
            env["OMP_NUM_THREADS"] = str(self.threads)
        return env

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """`flwr ARGS` in a session of its own; its whole process group is killed if this
        call is left early (timeout, exception, a signal's `Stopped`)."""
        command = [str(Path(sys.executable).parent / "flwr"), *args]
        with subprocess.Popen(
            command,
            cwd=self.app_dir,
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        ) as process:
            try:
                stdout, stderr = process.communicate(timeout=timeout)
            except BaseException:
                # not reaped yet, so its group id cannot have been reused: kill the group
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                raise
        return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)

    def start(self, overrides: str, federation: str = QUICK_START_FEDERATION) -> str:
        """`flwr run .` with `-c overrides`; returns the run id once it started."""
        started = self.flwr("run", ".", "--federation-config", federation, "-c", overrides)
        said = started.stdout + started.stderr
        found = re.search(r"started run (\d+)", said)
        if started.returncode != 0 or found is None:
            raise FedsynthError(f"flwr run did not start: {said[-2000:]}")
        return found.group(1)

    def status(self, run_id: str) -> str:
        listed = self.flwr("ls", "--run-id", run_id, "--format", "json")
        [run] = json.loads(listed.stdout)["runs"]
        return str(run["status"])

    def wait(self, run_id: str, timeout: float) -> tuple[str, str]:
        """(status, log) once the run finished or `timeout` seconds passed (status then
        the last one seen, e.g. "running")."""
        status, deadline = "running", time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status(run_id)
            if status.startswith("finished"):
                break
            time.sleep(3)
        return status, self.flwr("log", run_id, "--show").stdout

    def run(self, overrides: str, timeout: float, federation: str = QUICK_START_FEDERATION) -> str:
        """A whole run; its log. Raises FedsynthError unless it completed."""
        run_id = self.start(overrides, federation)
        status, log = self.wait(run_id, timeout)
        if status != "finished:completed":
            raise FedsynthError(f"flwr run {run_id} ended {status}:\n{log[-4000:]}")
        return log

    def pids(self, program: str = "") -> list[int]:
        """Pids of the processes whose environment names this FLWR_HOME (everything the
        local SuperLink started inherits it), only those running `program` if named."""
        return marked([self.home], program)

    def stop(self, grace: float = 15.0) -> None:
        """Stop the SuperLink and everything it left (simulation, Ray) by pid."""
        stop(self.pids(), grace)
