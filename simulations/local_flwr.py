"""A real `flwr run .` on this machine, in a Flower home of its own, stopped by pid.

`flwr run .` starts a local simulation SuperLink that outlives the command; on Flower's
default ports it would join any other local SuperLink (a study someone else runs). A
`LocalFlower` gives each use its own FLWR_HOME, whose default SuperLink is a local
simulation one on free 127.0.0.1 ports, with runtime dependency installation off, and
stops, by pid, every process that inherited that FLWR_HOME (SuperLink, simulation, Ray).
`flwr run` exits 0 even when the ServerApp fails, so a run's end and status are read
back with `flwr ls --run-id ID --format json`.

Used by `fedsynth bench` (the round overhead of a real run) and the slow tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

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


def stop(pids: list[int], grace: float = 15.0) -> None:
    """SIGTERM the given pids, then SIGKILL whatever is left after `grace` seconds."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        pids = [pid for pid in pids if alive(pid)]
        time.sleep(0.5)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


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
        flwr = Path(sys.executable).parent / "flwr"
        return subprocess.run(
            [str(flwr), *args],
            cwd=self.app_dir,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

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
        marker, pids = f"FLWR_HOME={self.home}".encode(), []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
                environ = (proc / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker in environ and (
                not program or any(program.encode() in part for part in cmdline[:2])
            ):
                pids.append(int(proc.name))
        return pids

    def stop(self) -> None:
        """Stop the SuperLink and everything it left (simulation, Ray) by pid."""
        stop(self.pids())
