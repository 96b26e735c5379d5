"""Hospital deployment on loopback: TLS, node authentication, signed apps, one SecAgg+ round.

Everything is a real process, as in deploy/README.md: certificates and node keys from the
deploy/ scripts; a `flower-superlink` with TLS and `--enable-supernode-auth`; two site keys
registered with `flwr supernode register`; two `flower-supernode`s with the root
certificate, their private keys, the coordinator's app-signing key as their only trusted
entity and a node config (phantom sites, the tiny public checkpoint). The study runs as the
coordinator-signed app with real sites (run config `data="sites"` and a `checkpoint`). A
third SuperNode whose key was never registered must be refused and never join; so must a
SuperNode with a registered key that trusts another study's CA, and a plaintext
(`--insecure`) one, while the same key with the study's CA gets in. A rogue app (unsigned
`flwr run DIR`, or signed by another key) must get an error reply from every site and none
of its code may run there. Flower 1.41 attaches app signatures only to apps fetched from
Flower Hub, so a Hub stand-in on 127.0.0.1 (`FLWR_SUPERGRID_API_URL`) serves the FABs and
their signatures, made as `flwr app review` makes them. Only 127.0.0.1 and ports picked at
run time; every process started here is stopped in `finally`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from fedsynth.common.ledger import read_ledger

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
SUBJECTS = 2  # per site: keeps the round short, delta 1e-5 < 1/2
# what flower-supernode logs when a TLS SuperLink drops its plaintext request unanswered
PLAINTEXT_REFUSED = "Server disconnected without sending a response|Connection reset by peer"


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
    """SIGTERM each process and all it spawned (SuperExec, app processes), then SIGKILL.

    A process already reaped is skipped: its pid may belong to someone else by now."""
    pids = []
    for proc in procs:
        if proc.poll() is None:
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
    reaped = {proc.pid for proc in procs if proc.poll() is not None}
    for pid in set(pids) - reaped:
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


def _tls_superlink(certs: Path, port: int) -> list[str]:
    """flower-superlink on 127.0.0.1:`port` as the runbook starts it: TLS with the
    certificates of deploy/make-certs.sh in `certs`, node authentication, no runtime
    dependency installation."""
    return [
        str(BIN / "flower-superlink"),
        "--ssl-ca-certfile",
        str(certs / "ca.crt"),
        "--ssl-certfile",
        str(certs / "server.crt"),
        "--ssl-keyfile",
        str(certs / "server.key"),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


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


@contextlib.contextmanager
def _hub(apps: dict[str, tuple[bytes, list[dict]]]) -> Iterator[str]:
    """A Flower Hub stand-in on 127.0.0.1: app spec -> (FAB, verification records).

    It answers the two requests a SuperLink makes for `flwr run @publisher/app==x.y.z`
    (POST /hub/fetch-fab, then GET of the returned fab_url); yields the base URL to put in
    the SuperLink's FLWR_SUPERGRID_API_URL.
    """

    class Handler(BaseHTTPRequestHandler):
        def _send(self, body: bytes, kind: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            asked = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            spec = f"{asked.get('app_id')}=={asked.get('app_version')}"
            if self.path != "/hub/fetch-fab" or spec not in apps:  # e.g. the update check
                self.send_error(404)
                return
            url = f"http://127.0.0.1:{self.server.server_port}/fab/{spec}"
            body = {"fab_url": url, "verifications": apps[spec][1]}
            self._send(json.dumps(body).encode(), "application/json")

        def do_GET(self) -> None:
            self._send(apps[self.path.removeprefix("/fab/")][0], "application/octet-stream")

        def log_message(self, *args) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def _signature(fab: bytes, key_id: str, private_key: Path) -> dict:
    """A verification record for `fab`, signed as `flwr app review` signs (Ed25519 over
    the signing time and the FAB's SHA-256)."""
    from flwr.supercore.primitives.asymmetric_ed25519 import (
        create_message_to_sign,
        load_private_key,
        sign_message,
    )

    signed_at = int(time.time())
    message = create_message_to_sign(hashlib.sha256(fab).digest(), signed_at)
    signature = sign_message(load_private_key(private_key), message)
    encoded = base64.urlsafe_b64encode(signature).rstrip(b"=").decode()
    return {"public_key_id": key_id, "signature": encoded, "signed_at": signed_at}


ROGUE_APP = """
import json, os, time
from pathlib import Path
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

OUT = Path({out!r})
server = ServerApp()
client = ClientApp()

@server.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.monotonic() + 60
    while len(nodes := list(grid.get_node_ids())) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    asks = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in nodes]
    replies = grid.send_and_receive(asks, timeout=60)
    errors = {{str(r.metadata.src_node_id): r.has_error() for r in replies}}
    (OUT / f"replies-{{context.run_id}}.json").write_text(json.dumps(errors))

@client.query()
def query(msg: Message, context: Context) -> Message:
    # what any code run at a hospital could do: read the site's data folder
    listing = sorted(os.listdir(context.node_config["data-path"]))
    (OUT / f"ran-at-{{context.node_id}}").write_text(json.dumps(listing))
    return Message(RecordDict(), reply_to=msg)
"""


def _rogue_app(folder: Path, out: Path, version: str) -> Path:
    """An app that would list each site's data folder if a SuperNode ran its ClientApp."""
    folder.mkdir()
    (folder / "rogue_app.py").write_text(ROGUE_APP.format(out=str(out)))
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
        f'[project]\nname = "rogue"\nversion = "{version}"\ndependencies = []\n'
        '[tool.flwr.app]\npublisher = "rogue"\n'
        '[tool.flwr.app.components]\nserverapp = "rogue_app:server"\n'
        'clientapp = "rogue_app:client"\n'
    )
    return folder


def _wait_run(home: Path, run_id: str, timeout: float) -> str:
    """The run's status once it has finished (or the last one seen at the timeout)."""
    status, deadline = "running", time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = _flwr(home, "ls", "--run-id", run_id, "study", "--format", "json")
        [run] = json.loads(listed.stdout)["runs"]
        status = run["status"]
        if status.startswith("finished"):
            break
        time.sleep(2)
    return status


def _run_id(started: subprocess.CompletedProcess) -> str:
    assert started.returncode == 0, started.stdout + started.stderr
    return re.search(r"started run (\d+)", started.stdout + started.stderr).group(1)


def _probe(
    tmp_path: Path, name: str, port: int, tls: list[str], key: Path | None, trusted: Path
) -> subprocess.Popen:
    """The runbook's `flower-supernode` with `tls` in place of `--root-certificates ca.crt`
    (and `key`, if any, as its node key); it gives up after one retry. Logs to NAME.log."""
    home = tmp_path / f"{name}-home"
    home.mkdir()
    auth = ["--auth-supernode-private-key", str(key)] if key else []
    return _start(
        [
            str(BIN / "flower-supernode"),
            "--superlink",
            f"127.0.0.1:{port}",
            *tls,
            *auth,
            "--trusted-entities",
            str(trusted),
            "--port",
            str(_free_port()),
            "--max-retries",
            "1",
            "--max-wait-time",
            "15",
        ],
        home,
        tmp_path / f"{name}.log",
    )


def _exit_code(proc: subprocess.Popen, timeout: float) -> int | None:
    """The process's exit status, or None if it still runs after `timeout` seconds."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        return proc.wait(timeout=timeout)
    return None


def test_scripts_make_a_ca_a_server_certificate_and_node_keys(tmp_path):
    certs, keys = tmp_path / "certs", tmp_path / "keys"
    made = _script(DEPLOY / "make-certs.sh", certs, "superlink", "127.0.0.1")
    assert made.returncode == 0, made.stderr
    san = subprocess.run(
        ["openssl", "x509", "-in", certs / "server.crt", "-noout", "-ext", "subjectAltName"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "DNS:superlink" in san and "IP Address:127.0.0.1" in san
    verified = subprocess.run(
        ["openssl", "verify", "-CAfile", certs / "ca.crt", certs / "server.crt"],
        capture_output=True,
        text=True,
        check=False,
    )
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


def test_signed_app_deployment_one_round_rogue_app_and_unregistered_node_refused(
    tmp_path, tiny_checkpoint
):
    from flwr.cli.build import build_fab_from_disk

    from fedsynth.simulations.phantoms import generate_cohorts

    generate_cohorts(tmp_path / "data", sites=2, subjects=SUBJECTS, seed=3, progress=False)
    certs, keys, run_dir = tmp_path / "certs", tmp_path / "keys", tmp_path / "run"
    assert _script(DEPLOY / "make-certs.sh", certs, "127.0.0.1", "localhost").returncode == 0
    # another study's CA, with a server certificate for the same names
    other = _script(DEPLOY / "make-certs.sh", tmp_path / "other-certs", "127.0.0.1", "localhost")
    assert other.returncode == 0, other.stderr
    for name in ("site-1", "site-2", "rogue", "probe"):
        assert _script(DEPLOY / "make-node-key.sh", keys, name).returncode == 0

    # app signing: the coordinator's Ed25519 key is every site's only trusted entity
    signers = {name: f"fpk_{uuid.uuid4()}" for name in ("coordinator", "intruder")}
    for name in signers:
        subprocess.run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                name,
                "-f",
                keys / f"{name}-signing",
            ],
            check=True,
        )
    trusted = tmp_path / "trusted-entities.yaml"
    made = _script(
        DEPLOY / "trusted-entities.sh",
        trusted,
        signers["coordinator"],
        keys / "coordinator-signing.pub",
    )
    assert made.returncode == 0, made.stderr
    fab = build_fab_from_disk(ROOT)
    rogue_out = tmp_path / "rogue-out"
    rogue_out.mkdir()
    # (two versions: a SuperLink keeps one verification record per FAB content)
    rogue_app = _rogue_app(tmp_path / "rogue-app", rogue_out, "1.0.0")
    rogue_fab = build_fab_from_disk(_rogue_app(tmp_path / "rogue-hub", rogue_out, "1.0.1"))
    apps = {
        "@fedsynth/fedsynth==0.1.0": (
            fab,
            [_signature(fab, signers["coordinator"], keys / "coordinator-signing")],
        ),
        # signed by a key no site trusts, plus the coordinator's signature of another FAB
        "@rogue/rogue==1.0.1": (
            rogue_fab,
            [
                _signature(rogue_fab, signers["intruder"], keys / "intruder-signing"),
                {
                    **_signature(fab, signers["coordinator"], keys / "coordinator-signing"),
                    "public_key_id": signers["coordinator"],
                },
            ],
        ),
    }

    # the coordinator's `flwr` connection: address and the study's root certificate
    port = _free_port()
    cli = tmp_path / "coordinator-cli"
    connected = _script(
        DEPLOY / "flwr-connection.sh", cli, "study", f"127.0.0.1:{port}", certs / "ca.crt"
    )
    assert connected.returncode == 0, connected.stderr
    procs: list[subprocess.Popen] = []
    logs = {name: tmp_path / f"{name}.log" for name in ("superlink", "site-1", "site-2", "rogue")}
    with contextlib.ExitStack() as stack:
        hub = stack.enter_context(_hub(apps))
        stack.callback(_stop, procs)
        link_home = tmp_path / "superlink-home"
        link_home.mkdir()
        procs.append(
            _start(
                [*_tls_superlink(certs, port), "--database", str(tmp_path / "superlink.db")],
                link_home,
                logs["superlink"],
                {"FLWR_SUPERGRID_API_URL": hub},
            )
        )
        registered = subprocess.run(
            [
                "bash",
                str(DEPLOY / "register-sites.sh"),
                "study",
                str(keys / "site-1.key.pub"),
                str(keys / "site-2.key.pub"),
                str(keys / "probe.key.pub"),
            ],
            env=_env(cli),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert registered.returncode == 0, registered.stderr + logs["superlink"].read_text()
        node_ids = dict(line.split() for line in registered.stdout.splitlines())
        assert sorted(node_ids) == ["probe", "site-1", "site-2"], registered.stdout

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
                    [
                        str(BIN / "flower-supernode"),
                        "--superlink",
                        f"127.0.0.1:{port}",
                        "--root-certificates",
                        str(certs / "ca.crt"),
                        "--auth-supernode-private-key",
                        str(keys / f"{name}.key"),
                        "--trusted-entities",
                        str(trusted),
                        "--port",
                        str(_free_port()),
                        "--max-retries",
                        "1",
                        "--max-wait-time",
                        "15",
                        "--node-config",
                        node_config,
                    ],
                    home,
                    logs[name],
                )
            )
        # site-2 through the site container's entrypoint: site-check, then the SuperNode
        (tmp_path / "site-2-home").mkdir()
        site_2 = {
            "SUPERLINK": f"127.0.0.1:{port}",
            "SITE_NAME": "site-2",
            "MAX_EPSILON": "10",
            "DATA_PATH": str(tmp_path / "data" / "site-2"),
            "STATE_DIR": str(tmp_path / "state" / "site-2"),
            "CHECKPOINT": str(tiny_checkpoint),
            "ROOT_CERT": str(certs / "ca.crt"),
            "NODE_KEY": str(keys / "site-2.key"),
            "TRUSTED_ENTITIES": str(trusted),
            "STUDY_CONFIG": "tiny",
        }
        procs.append(
            _start(
                [
                    "bash",
                    str(DEPLOY / "site-entrypoint.sh"),
                    "--port",
                    str(_free_port()),
                    "--max-retries",
                    "1",
                    "--max-wait-time",
                    "15",
                ],
                tmp_path / "site-2-home",
                logs["site-2"],
                site_2,
            )
        )
        rogue = procs[-2]
        # TLS: the registered probe key trusting another study's CA, and plaintext
        # SuperNodes; none may reach the SuperLink (flower-supernode 1.41 exits at once on a
        # failed certificate check; a plaintext one retries, then gives up)
        probes = {  # name -> (TLS flags, node key, what the SuperNode logs when refused)
            "wrong-ca": (
                ["--root-certificates", str(tmp_path / "other-certs" / "ca.crt")],
                keys / "probe.key",
                "CERTIFICATE_VERIFY_FAILED",
            ),
            # the SuperLink speaks only TLS: a plaintext request gets no HTTP answer (the
            # connection is closed, or reset when the request was still unread)
            "plaintext": (["--insecure"], None, PLAINTEXT_REFUSED),
            # Flower never sends a node key in clear (refused before connecting)
            "plaintext-keyed": (
                ["--insecure"],
                keys / "probe.key",
                "Node authentication can only be used when TLS is enabled",
            ),
        }
        started = {
            name: _probe(tmp_path, name, port, tls, key, trusted)
            for name, (tls, key, _) in probes.items()
        }
        procs.extend(started.values())

        def nodes() -> dict[str, str]:
            listed = _flwr(cli, "supernode", "list", "study", "--format", "json")
            assert listed.returncode == 0, listed.stdout + listed.stderr
            return {n["node-id"]: n["status"] for n in json.loads(listed.stdout)["nodes"]}

        # the study: the coordinator-signed app, as `flwr run @fedsynth/fedsynth==0.1.0`
        run_id = _run_id(
            _flwr(
                cli,
                "run",
                "@fedsynth/fedsynth==0.1.0",
                "study",
                "-c",
                f'config="tiny" data="sites" federation.rounds=1 federation.sites=2 '
                f'federation.sites-per-round=2 checkpoint="{tiny_checkpoint}" '
                f'run-dir="{run_dir}" secagg-max-weight={SUBJECTS}',
                timeout=120,
            )
        )
        # (the ServerApp waits for its sites; meanwhile: registering again is harmless)
        again = subprocess.run(
            ["bash", str(DEPLOY / "register-sites.sh"), "study", str(keys / "site-1.key.pub")],
            env=_env(cli),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert again.returncode == 0 and again.stdout.split() == ["site-1", "already-registered"]

        # the unregistered key: the SuperLink refuses to activate it and it gives up
        rogue.wait(timeout=60)
        assert rogue.returncode != 0
        assert "Failed to activate SuperNode" in logs["rogue"].read_text()
        assert "No SuperNode found with the given public key" in logs["superlink"].read_text()
        for name, (_, _, refusal) in probes.items():
            assert _exit_code(started[name], 60) not in (0, None), name
            assert re.search(refusal, (tmp_path / f"{name}.log").read_text()), name

        status = _wait_run(cli, run_id, 240)
        log = _flwr(cli, "log", run_id, "study", "--show").stdout
        assert status == "finished:completed", f"run {run_id} ended {status}:\n{log[-4000:]}"
        # (Flower's SQLite state can drop ServerApp log lines under load: "database is
        # locked" on push-logs; the summary and ledgers below still show the round)
        if '"POST /v1/runtime/push-logs HTTP/1.1" 500' not in logs["superlink"].read_text():
            assert "Secure aggregation completed" in log, log[-4000:]
        # neither the rogue nor a TLS probe joined: the sites came online, the probe's key
        # was never activated and no other node exists
        assert nodes() == {
            node_ids["site-1"]: "online",
            node_ids["site-2"]: "online",
            node_ids["probe"]: "registered",
        }

        # whoever reaches the SuperLink's Control API starts their own app: unsigned (a
        # local FAB), then from the "Hub" signed by a key no site trusts
        rogue_runs = [
            _run_id(_flwr(cli, "run", str(rogue_app), "study")),
            _run_id(_flwr(cli, "run", "@rogue/rogue==1.0.1", "study")),
        ]
        for rogue_run in rogue_runs:
            assert _wait_run(cli, rogue_run, 120).startswith("finished")
            replies = json.loads((rogue_out / f"replies-{rogue_run}.json").read_text())
            assert replies == {node_ids["site-1"]: True, node_ids["site-2"]: True}, replies
        assert not list(rogue_out.glob("ran-at-*"))  # no site ran the rogue ClientApp
        for site in ("site-1", "site-2"):  # unsigned, then signed by the wrong key
            text = logs[site].read_text()
            assert text.count("App verification is not supported by the connected") == 1
            assert text.count("FAB verification failed") == 1

        # the wrong-CA probe with the study's CA instead gets in: the CA made the difference
        # (a plaintext SuperLink admits the plaintext probe: tests/test_deploy_tls.py)
        study_ca = ["--root-certificates", str(certs / "ca.crt")]
        right_ca = _probe(tmp_path, "right-ca", port, study_ca, keys / "probe.key", trusted)
        procs.append(right_ca)
        deadline = time.monotonic() + 60
        while nodes()[node_ids["probe"]] != "online" and time.monotonic() < deadline:
            time.sleep(1)
        assert nodes()[node_ids["probe"]] == "online", (tmp_path / "right-ca.log").read_text()
        _stop([right_ca])

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


def _entrypoint(
    tmp_path: Path, **env: str | None
) -> tuple[subprocess.CompletedProcess, list, list]:
    """Run site-entrypoint.sh with fake `fedsynth` and `flower-supernode` on PATH; a
    variable given as None is left unset.

    Returns the process and the argv each fake was called with (empty: not called).
    """
    fakes = tmp_path / "bin"
    fakes.mkdir(exist_ok=True)
    for name in ("fedsynth", "flower-supernode"):
        fake = fakes / name
        fake.write_text(
            f"#!{sys.executable}\n"
            "import json, sys\n"
            f"open({str(tmp_path / (name + '.argv'))!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
        )
        fake.chmod(0o755)
    site = tmp_path / "site"
    for f in ("ca.crt", "site.key", "trusted.yaml", "ckpt/autoencoder.pt", "data/manifest.csv"):
        (site / f).parent.mkdir(parents=True, exist_ok=True)
        (site / f).write_text("x")
    base = {
        "PATH": f"{fakes}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "STUDY_CONFIG": "/study/config.yaml",
        "SUPERLINK": "link:9093",
        "SITE_NAME": "site-1",
        "MAX_EPSILON": "7.5",
        "DATA_PATH": str(site / "data"),
        "STATE_DIR": str(site / "state"),
        "CHECKPOINT": str(site / "ckpt"),
        "ROOT_CERT": str(site / "ca.crt"),
        "NODE_KEY": str(site / "site.key"),
        "TRUSTED_ENTITIES": str(site / "trusted.yaml"),
    }
    done = subprocess.run(
        ["bash", str(DEPLOY / "site-entrypoint.sh"), "--max-retries", "3"],
        env={k: v for k, v in {**base, **env}.items() if v is not None},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    argv = [
        json.loads(p.read_text()) if (p := tmp_path / f"{name}.argv").exists() else []
        for name in ("fedsynth", "flower-supernode")
    ]
    return done, *argv


def test_site_entrypoint_checks_the_study_config_and_passes_the_node_config_intact(tmp_path):
    from flwr.common.config import parse_config_args

    done, check, supernode = _entrypoint(tmp_path)
    assert done.returncode == 0, done.stderr
    site = tmp_path / "site"
    assert check == [
        "site-check",
        "--config",
        "/study/config.yaml",
        "--data-path",
        str(site / "data"),
        "--json",
    ]
    flags = dict(zip(supernode[:-2:2], supernode[1:-2:2], strict=True))
    assert supernode[-2:] == ["--max-retries", "3"]
    assert flags["--trusted-entities"] == str(site / "trusted.yaml")
    assert flags["--superlink"] == "link:9093"
    # Flower reads the node config back to exactly these values and types
    assert parse_config_args([flags["--node-config"]]) == {
        "data-path": str(site / "data"),
        "state-dir": str(site / "state"),
        "site-name": "site-1",
        "checkpoint": str(site / "ckpt"),
        "max-epsilon": 7.5,
    }


def test_site_entrypoint_passes_every_site_term_to_the_node_config_exactly(tmp_path):
    """Each site term of client/node_config.py, set in the environment, reaches the node
    config flower-supernode parses with the type and value the SuperNode checks."""
    from flwr.common.config import parse_config_args

    done, _, supernode = _entrypoint(
        tmp_path,
        MAX_EPSILON="3",
        MAX_DELTA="1e-6",
        ACCOUNTANT="prv",
        REQUIRE_SECURE_AGGREGATION="False",
        DISCLOSE_SUBJECT_COUNT="TRUE",
        PUBLIC_SUBJECTS="120",
    )
    assert done.returncode == 0, done.stderr
    flags = dict(zip(supernode[:-2:2], supernode[1:-2:2], strict=True))
    config = parse_config_args([flags["--node-config"]])
    site = tmp_path / "site"
    assert config == {
        "data-path": str(site / "data"),
        "state-dir": str(site / "state"),
        "site-name": "site-1",
        "checkpoint": str(site / "ckpt"),
        "max-epsilon": 3,
        "max-delta": 1e-6,
        "accountant": "prv",
        "require-secure-aggregation": False,
        "disclose-subject-count": True,
        "public-subjects": 120,
    }
    assert [type(config[k]) for k in ("max-delta", "public-subjects")] == [float, int]
    assert type(config["require-secure-aggregation"]) is bool


def test_site_entrypoint_node_config_is_read_by_the_site(tmp_path):
    """The same string, through Flower's parser, into client/node_config.py's site terms."""
    from flwr.common.config import parse_config_args

    from fedsynth.client.node_config import site_settings

    done, _, supernode = _entrypoint(
        tmp_path, MAX_DELTA="0.00001", ACCOUNTANT="rdp", REQUIRE_SECURE_AGGREGATION="true"
    )
    assert done.returncode == 0, done.stderr
    flags = dict(zip(supernode[:-2:2], supernode[1:-2:2], strict=True))
    settings = site_settings(parse_config_args([flags["--node-config"]]), target_epsilon=1.0)
    assert (settings.max_epsilon, settings.max_delta) == (7.5, 1e-5)
    assert (settings.accountant, settings.require_secure_aggregation) == ("rdp", True)


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("SITE_NAME", "a b"),
        ("SITE_NAME", 'x" max-epsilon=1000 y="'),
        ("SITE_NAME", "a=b"),
        ("DATA_PATH", "/data/my study"),
        ("STATE_DIR", "/s'x"),
        ("CHECKPOINT", "C:\\ckpt"),
        ("SITE_NAME", "a\nb"),
        ("SITE_NAME", ""),
        ("MAX_EPSILON", "10 checkpoint=/x"),
        ("MAX_EPSILON", "inf"),
        ("MAX_EPSILON", "07.5"),  # TOML: no leading zeros (Flower's parser would fail)
        ("MAX_EPSILON", ".5"),
        ("MAX_EPSILON", "0"),
        ("STUDY_CONFIG", ""),
        ("MAX_DELTA", ""),
        ("MAX_DELTA", "1"),
        ("MAX_DELTA", "0"),
        ("MAX_DELTA", "2e-1x"),
        ("MAX_DELTA", "1e-5 max-epsilon=1000"),
        ("MAX_DELTA", "01e-5"),
        ("ACCOUNTANT", "gdp"),
        ("ACCOUNTANT", 'rdp" max-epsilon="1000'),
        ("REQUIRE_SECURE_AGGREGATION", "no"),
        ("REQUIRE_SECURE_AGGREGATION", "false max-epsilon=1000"),
        ("DISCLOSE_SUBJECT_COUNT", "1"),
        ("DISCLOSE_SUBJECT_COUNT", ""),
        ("PUBLIC_SUBJECTS", "12.5"),
        ("PUBLIC_SUBJECTS", "0"),
        ("PUBLIC_SUBJECTS", "012"),
        ("PUBLIC_SUBJECTS", "-3"),
        ("PUBLIC_SUBJECTS", "120 disclose-subject-count=true"),
    ],
)
def test_site_entrypoint_refuses_unsafe_values_in_one_line(tmp_path, var, value):
    done, check, supernode = _entrypoint(tmp_path, **{var: value})
    assert done.returncode == 2 and check == [] and supernode == []
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"site: {var}")


def test_site_entrypoint_refuses_a_declared_size_without_max_delta_in_one_line(tmp_path):
    """A site declaring its size checks a study's delta against max-delta alone (so no
    answer depends on its real count): the node config would be refused at every round."""
    done, check, supernode = _entrypoint(tmp_path, PUBLIC_SUBJECTS="120")
    assert done.returncode == 2 and check == [] and supernode == []
    assert done.stderr == (
        "site: PUBLIC_SUBJECTS: needs MAX_DELTA, the largest delta the site accepts "
        "(below 1/its subject count, e.g. 1e-5)\n"
    )


@pytest.mark.parametrize("var", ["SITE_NAME", "MAX_EPSILON"])
def test_site_image_has_no_default_site_name_or_ceiling(tmp_path, var):
    """The site image's ENV gives neither: the entrypoint refuses a site that states none."""
    image_env = " ".join(
        args for op, args in _instructions(DEPLOY / "Dockerfile.site") if op == "ENV"
    )
    assert var not in {word.split("=")[0] for word in image_env.split()}
    done, check, supernode = _entrypoint(tmp_path, **{var: None})
    assert done.returncode == 2 and check == [] and supernode == []
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"site: {var}")


def test_site_entrypoint_needs_trusted_signers_unless_explicitly_off(tmp_path):
    done, _, supernode = _entrypoint(tmp_path, TRUSTED_ENTITIES=str(tmp_path / "missing.yaml"))
    assert done.returncode == 1 and "missing.yaml is missing" in done.stderr and not supernode
    done, _, supernode = _entrypoint(tmp_path, TRUSTED_ENTITIES="none")
    assert done.returncode == 0 and "ANY app" in done.stderr
    assert "--trusted-entities" not in supernode


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (word.upper(), rest.strip())
        for line in lines
        if line and not line.startswith("#")
        for word, _, rest in [line.partition(" ")]
    ]


@pytest.mark.parametrize("dockerfile", ["Dockerfile.site", "Dockerfile.superlink"])
def test_dockerfiles_pin_the_base_and_dependencies_and_run_unprivileged(dockerfile):
    steps = _instructions(DEPLOY / dockerfile)
    [base] = [args for op, args in steps if op == "FROM"]
    # the base image by tag, and by digest when the build passes PYTHON_DIGEST (an ARG
    # before FROM; Docker's ${VAR:+word} gives "@" only when it is set)
    assert steps[0] == ("ARG", 'PYTHON_DIGEST=""') and ("ARG", "PYTHON_DIGEST") in steps
    tag = r"python:3\.11\.\d+-slim-bookworm"
    digest = "sha256:" + "0123456789abcdef" * 4
    for given, wanted in (("", tag), (digest, f"{tag}@{digest}")):
        named = base.replace("${PYTHON_DIGEST:+@}", "@" if given else "")
        assert re.fullmatch(wanted, named.replace("${PYTHON_DIGEST}", given)), base
    assert 'org.opencontainers.image.base.digest="${PYTHON_DIGEST}"' in dict(steps)["LABEL"]
    # compose.yaml passes the digest on to every build of this Dockerfile
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"].values()
    builds = [
        s["build"]
        for s in services
        if s.get("build", {}).get("dockerfile", "").endswith(dockerfile)
    ]
    assert builds and all(b["args"] == {"PYTHON_DIGEST": "${PYTHON_DIGEST:-}"} for b in builds)
    assert "latest" not in (DEPLOY / dockerfile).read_text()
    installs = [args for op, args in steps if op == "RUN" and "pip install" in args]
    assert installs and all("PIP_CONSTRAINT=" in args for args in installs)
    users = [args for op, args in steps if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    # the last USER comes after every RUN: nothing the image runs later is root
    last_user = max(i for i, (op, _) in enumerate(steps) if op == "USER")
    assert all(op != "RUN" for op, _ in steps[last_user:])


def test_site_image_ships_no_server_code():
    steps = _instructions(DEPLOY / "Dockerfile.site")
    copied = {args.split()[-2] for op, args in steps if op == "COPY"}
    assert not {"server", "simulations", "."} & copied, copied
    ignore = (DEPLOY / "Dockerfile.site.dockerignore").read_text().split()
    assert "*" in ignore and not {"!server", "!simulations"} & set(ignore)


def test_site_image_install_step_builds_a_package_without_server_code(tmp_path):
    """Dockerfile.site's COPY + `mkdir server simulations && pip install .`, as a wheel."""
    import shutil
    import zipfile

    steps = _instructions(DEPLOY / "Dockerfile.site")
    build = tmp_path / "build"
    for op, args in steps:
        *sources, target = args.split()
        if op != "COPY" or args.startswith("--") or target.startswith("/"):
            continue  # the build context's files only (not the entrypoint)
        for source in sources:
            dest = build / target / Path(source).name if target.endswith("/") else build / target
            dest.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if (ROOT / source).is_dir() else shutil.copyfile)(ROOT / source, dest)
    [install] = [args for op, args in steps if op == "RUN" and "pip install" in args]
    assert install.startswith("mkdir server simulations ")
    (build / "server").mkdir()
    (build / "simulations").mkdir()
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "wheel"),
            str(build),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    [wheel] = (tmp_path / "wheel").glob("fedsynth-*.whl")
    packages = {
        name.rsplit("/", 1)[0] for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".py")
    }
    assert packages == {"fedsynth/common", "fedsynth/client", "fedsynth/client/importers"}


def test_site_package_runs_without_server_and_simulations():
    """What the site image installs: site-check and the ClientApp, with no server/ code and
    without the simulation extra (no Ray)."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] == 'ray' or name.startswith(\n"
        "            ('fedsynth.server', 'fedsynth.simulations')\n"
        "        ):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import fedsynth.client.client_app\n"
        "from fedsynth.common.cli import main\n"
        "assert not any(m == 'ray' or m.startswith('ray.') for m in sys.modules)\n"
        "sys.exit(main(['site-check', '--help']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--data-path" in done.stdout


def _runtime_requirements() -> dict[str, str]:
    """Every distribution `pip install .` pulls for fedsynth (Linux x86_64, Python 3.11),
    at its installed version."""
    from importlib import metadata

    from packaging.requirements import Requirement

    env = {
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "python_version": "3.11",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
    }
    found: dict[str, tuple[str, frozenset]] = {}
    todo = [("fedsynth", frozenset[str]())]
    while todo:
        name, extras = todo.pop()
        dist = metadata.distribution(name)
        key = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        if key in found and extras <= found[key][1]:
            continue
        extras |= found.get(key, ("", frozenset()))[1]
        found[key] = (dist.version, extras)
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or any(
                req.marker.evaluate({**env, "extra": e}) for e in ("", *extras)
            ):
                todo.append((req.name, frozenset(req.extras)))
    found.pop("fedsynth")
    return {name: version.split("+")[0] for name, (version, _) in found.items()}


def test_image_constraints_pin_every_runtime_dependency_at_the_tested_version():
    pinned = dict(
        line.split("==")
        for line in (DEPLOY / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    )
    wanted = _runtime_requirements()
    listing = "\n".join(f"{k}=={v}" for k, v in sorted(wanted.items()))
    assert pinned == wanted, f"deploy/constraints.txt should list:\n{listing}"
