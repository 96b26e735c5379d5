"""The control for test_deploy.py's plaintext case: without TLS the same SuperNode gets in.

test_deploy.py starts a plaintext (`--insecure`) SuperNode against the study's TLS SuperLink
and asserts it is refused (no HTTP answer: PLAINTEXT_REFUSED in its log) and never
listed. Here the same SuperNode command meets a plaintext SuperLink and comes online, so that
refusal is TLS's doing and the listing would show a plaintext node that got in. (The wrong-CA
case has its control in test_deploy.py: the same key with the study's CA comes online.)
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import time

import pytest
from test_deploy import (
    BIN,
    DEPLOY,
    PLAINTEXT_REFUSED,
    _exit_code,
    _flwr,
    _free_port,
    _probe,
    _script,
    _start,
    _stop,
)


@pytest.mark.slow  # ~8 s: a SuperLink and a SuperNode start; the refusal itself is not slow
def test_a_plaintext_superlink_admits_the_plaintext_supernode_the_study_refuses(tmp_path):
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", tmp_path / "signing"], check=True
    )
    trusted = tmp_path / "trusted-entities.yaml"
    assert (
        _script(
            DEPLOY / "trusted-entities.sh",
            trusted,
            "fpk_00000000-0000-0000-0000-000000000000",
            tmp_path / "signing.pub",
        ).returncode
        == 0
    )
    port = _free_port()
    cli = tmp_path / "cli"
    cli.mkdir()
    (cli / "config.toml").write_text(
        f'[superlink]\ndefault = "plain"\n\n[superlink.plain]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    (tmp_path / "superlink-home").mkdir()
    procs: list[subprocess.Popen] = []
    with contextlib.ExitStack() as stack:
        stack.callback(_stop, procs)
        procs.append(
            _start(
                [
                    str(BIN / "flower-superlink"),
                    "--insecure",
                    "--disable-runtime-dependency-installation",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--database",
                    str(tmp_path / "superlink.db"),
                ],
                tmp_path / "superlink-home",
                tmp_path / "superlink.log",
            )
        )

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # (a SuperNode started earlier: "Connection refused")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                break
            time.sleep(0.2)
        # test_deploy.py's "plaintext" probe, word for word
        probe = _probe(tmp_path, "plaintext", port, ["--insecure"], None, trusted)
        procs.append(probe)
        online: list[str] = []
        while not online and time.monotonic() < deadline:
            listed = json.loads(_flwr(cli, "supernode", "list", "plain", "--format", "json").stdout)
            online = [n["node-id"] for n in listed["nodes"] if n["status"] == "online"]
        log = (tmp_path / "plaintext.log").read_text()
        assert len(online) == 1, log
        assert _exit_code(probe, 0) is None  # still connected, not giving up
        assert not re.search(PLAINTEXT_REFUSED, log)
