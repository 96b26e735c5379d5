"""Hospital deployment on loopback: TLS, node authentication, one SecAgg+ round, a refusal.

Everything is a real process, as in deploy/README.md: certificates and node keys from the
deploy/ scripts; a `flower-superlink` with TLS and `--enable-supernode-auth`; two site keys
registered with `flwr supernode register`; two `flower-supernode`s with the root
certificate, their private keys and a node config (phantom sites, the tiny public
checkpoint); `flwr run .` in deployment mode (a `checkpoint` run config). A third
SuperNode whose key was never registered must be refused and never join. Only 127.0.0.1
and ports picked at run time; every process started here is stopped in `finally`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedsynth.common.ledger import read_ledger

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
SUBJECTS = 2  # per site: keeps the round short, delta 1e-5 < 1/2


def _env(home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "FLWR_HOME": str(home),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _script(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def _flwr(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "flwr"), *args],
        cwd=ROOT,
        env=_env(home),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(proc.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _stop(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM each process and all it spawned (SuperExec, app processes), then SIGKILL."""
    pids = []
    for proc in procs:
        pids += [proc.pid, *_descendants(proc.pid)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        for proc in procs:
            proc.poll()  # reap our own children
        if not any(Path(f"/proc/{pid}").exists() and not _zombie(pid) for pid in pids):
            break
        time.sleep(0.3)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _start(
    cmd: list[str], home: Path, log: Path, extra: dict[str, str] | None = None
) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            cmd,
            cwd=log.parent,
            env={**_env(home), **(extra or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def test_scripts_make_a_ca_a_server_certificate_and_node_keys(tmp_path):
    certs, keys = tmp_path / "certs", tmp_path / "keys"
    made = _script(DEPLOY / "make-certs.sh", certs, "superlink", "127.0.0.1")
    assert made.returncode == 0, made.stderr
    san = subprocess.run(
        ["openssl", "x509", "-in", certs / "server.crt", "-noout", "-ext", "subjectAltName"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "DNS:superlink" in san and "IP Address:127.0.0.1" in san
    verified = subprocess.run(
        ["openssl", "verify", "-CAfile", certs / "ca.crt", certs / "server.crt"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert _script(DEPLOY / "make-node-key.sh", keys, "site-1").returncode == 0
    for private in (certs / "ca.key", certs / "server.key", keys / "site-1.key"):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    assert (keys / "site-1.key.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    # nothing is silently overwritten, and usage is printed on bad arguments
    again = _script(DEPLOY / "make-certs.sh", certs, "127.0.0.1")
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr
    assert _script(DEPLOY / "make-node-key.sh", keys, "site-1").returncode == 1
    assert _script(DEPLOY / "make-node-key.sh", keys, "bad name!").returncode == 2
    assert "Usage" in _script(DEPLOY / "make-certs.sh").stdout


def test_tls_node_auth_deployment_one_round_and_an_unregistered_node_refused(
    tmp_path, tiny_checkpoint
):
    from fedsynth.simulations.phantoms import generate_cohorts

    generate_cohorts(tmp_path / "data", sites=2, subjects=SUBJECTS, seed=3, progress=False)
    certs, keys, run_dir = tmp_path / "certs", tmp_path / "keys", tmp_path / "run"
    assert _script(DEPLOY / "make-certs.sh", certs, "127.0.0.1", "localhost").returncode == 0
    for name in ("site-1", "site-2", "rogue"):
        assert _script(DEPLOY / "make-node-key.sh", keys, name).returncode == 0

    # the coordinator's `flwr` connection: address and the study's root certificate
    port = _free_port()
    cli = tmp_path / "coordinator-cli"
    connected = _script(DEPLOY / "flwr-connection.sh", cli, "study", f"127.0.0.1:{port}",
                        certs / "ca.crt")  # fmt: skip
    assert connected.returncode == 0, connected.stderr
    procs: list[subprocess.Popen] = []
    logs = {name: tmp_path / f"{name}.log" for name in ("superlink", "site-1", "site-2", "rogue")}
    try:
        link_home = tmp_path / "superlink-home"
        link_home.mkdir()
        procs.append(
            _start(
                [str(BIN / "flower-superlink"),
                 "--ssl-ca-certfile", str(certs / "ca.crt"),
                 "--ssl-certfile", str(certs / "server.crt"),
                 "--ssl-keyfile", str(certs / "server.key"),
                 "--enable-supernode-auth",
                 "--disable-runtime-dependency-installation",
                 "--host", "127.0.0.1", "--port", str(port),
                 "--database", str(tmp_path / "superlink.db")],
                link_home,
                logs["superlink"],
            )
        )  # fmt: skip
        registered = subprocess.run(
            ["bash", str(DEPLOY / "register-sites.sh"), "study",
             str(keys / "site-1.key.pub"), str(keys / "site-2.key.pub")],
            env=_env(cli), capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert registered.returncode == 0, registered.stderr + logs["superlink"].read_text()
        node_ids = dict(line.split() for line in registered.stdout.splitlines())
        assert sorted(node_ids) == ["site-1", "site-2"], registered.stdout

        for name in ("site-1", "rogue"):  # the runbook's flower-supernode command
            home = tmp_path / f"{name}-home"
            home.mkdir()
            node_config = (
                f'data-path="{tmp_path / "data" / "site-1"}" '
                f'state-dir="{tmp_path / "state" / name}" '
                f'max-epsilon=10 site-name="{name}" checkpoint="{tiny_checkpoint}"'
            )
            procs.append(
                _start(
                    [str(BIN / "flower-supernode"),
                     "--superlink", f"127.0.0.1:{port}",
                     "--root-certificates", str(certs / "ca.crt"),
                     "--auth-supernode-private-key", str(keys / f"{name}.key"),
                     "--port", str(_free_port()),
                     "--max-retries", "1", "--max-wait-time", "15",
                     "--node-config", node_config],
                    home,
                    logs[name],
                )
            )  # fmt: skip
        # site-2 through the site container's entrypoint: site-check, then the SuperNode
        (tmp_path / "site-2-home").mkdir()
        site_2 = {
            "SUPERLINK": f"127.0.0.1:{port}", "SITE_NAME": "site-2", "MAX_EPSILON": "10",
            "DATA_PATH": str(tmp_path / "data" / "site-2"),
            "STATE_DIR": str(tmp_path / "state" / "site-2"),
            "CHECKPOINT": str(tiny_checkpoint), "ROOT_CERT": str(certs / "ca.crt"),
            "NODE_KEY": str(keys / "site-2.key"),
        }  # fmt: skip
        procs.append(
            _start(
                ["bash", str(DEPLOY / "site-entrypoint.sh"), "--port", str(_free_port()),
                 "--max-retries", "1", "--max-wait-time", "15"],
                tmp_path / "site-2-home",
                logs["site-2"],
                site_2,
            )
        )  # fmt: skip
        rogue = procs[-2]

        def nodes() -> dict[str, str]:
            listed = _flwr(cli, "supernode", "list", "study", "--format", "json")
            assert listed.returncode == 0, listed.stdout + listed.stderr
            return {n["node-id"]: n["status"] for n in json.loads(listed.stdout)["nodes"]}

        started = _flwr(
            cli, "run", ".", "study", "-c",
            f'config="tiny" federation.rounds=1 federation.sites=2 '
            f'federation.sites-per-round=2 checkpoint="{tiny_checkpoint}" '
            f'run-dir="{run_dir}" secagg-max-weight={SUBJECTS}',
            timeout=120,
        )  # fmt: skip
        assert started.returncode == 0, started.stdout + started.stderr
        run_id = re.search(r"started run (\d+)", started.stdout + started.stderr).group(1)
        # (the ServerApp waits for its sites; meanwhile: registering again is harmless)
        again = subprocess.run(
            ["bash", str(DEPLOY / "register-sites.sh"), "study", str(keys / "site-1.key.pub")],
            env=_env(cli), capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert again.returncode == 0 and again.stdout.split() == ["site-1", "already-registered"]

        # the unregistered key: the SuperLink refuses to activate it and it gives up
        rogue.wait(timeout=60)
        assert rogue.returncode != 0
        assert "Failed to activate SuperNode" in logs["rogue"].read_text()
        assert "No SuperNode found with the given public key" in logs["superlink"].read_text()

        status, deadline = "running", time.monotonic() + 240
        while time.monotonic() < deadline:
            listed = _flwr(cli, "ls", "--run-id", run_id, "study", "--format", "json")
            [run] = json.loads(listed.stdout)["runs"]
            status = run["status"]
            if status.startswith("finished"):
                break
            time.sleep(2)
        log = _flwr(cli, "log", run_id, "study", "--show").stdout
        assert status == "finished:completed", f"run {run_id} ended {status}:\n{log[-4000:]}"
        assert "Secure aggregation completed" in log, log[-4000:]
        # the rogue never joined: only the two registered nodes exist, both came online
        assert nodes() == {node_ids["site-1"]: "online", node_ids["site-2"]: "online"}
    finally:
        _stop(procs)

    ledger = read_ledger(run_dir / "ledger.jsonl")
    assert sorted(e["site"] for e in ledger) == ["site-1", "site-2"]
    assert all(e["status"] == "trained" and e["round"] == 1 for e in ledger)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_done"] == 1 and summary["secure_aggregation"] is True
    for site in ("site-1", "site-2"):  # each site's own ledger, in its own state dir
        assert len(read_ledger(tmp_path / "state" / site / "ledger.jsonl")) == 1
    assert not (tmp_path / "state" / "rogue").exists()
    assert '"usable": 4' in logs["site-2"].read_text()  # site-check ran before joining


@pytest.mark.parametrize("script", sorted(p.name for p in DEPLOY.glob("*.sh")))
def test_scripts_are_strict_bash_with_usage(script):
    text = (DEPLOY / script).read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    assert "Usage" in text and os.access(DEPLOY / script, os.X_OK)
    assert subprocess.run(["bash", "-n", DEPLOY / script], check=False).returncode == 0
