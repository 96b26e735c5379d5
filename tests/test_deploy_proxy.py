"""The SuperLink's Control API stays on the coordinator: loopback, with a Fleet-only proxy.

Flower 1.41 serves the Fleet, Control and Runtime APIs on the SuperLink's one --host/--port,
and the Control API (start runs = run code at every site; register node keys) has no
authentication. So the shipped setup binds the SuperLink to 127.0.0.1 and lets the sites in
through deploy/fleet-proxy.conf.template (nginx), which forwards /v1/fleet/NAME alone.
Checked here: the images and compose.yaml publish nothing but the proxy, and, with a real
nginx built from the template exactly as deploy/README.md does it, a real SuperNode comes
online through the proxy while `flwr` through it is refused and every other path is 404.
Only 127.0.0.1 and ports picked at run time; every process started is stopped.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from test_deploy import (
    BIN,
    DEPLOY,
    _env,
    _flwr,
    _free_port,
    _instructions,
    _script,
    _start,
    _stop,
    _tls_superlink,
)

TEMPLATE = DEPLOY / "fleet-proxy.conf.template"
# the runbook's substitution: only these three, so nginx's own $variables stay
ENVSUBST_VARS = "${FLEET_PROXY_LISTEN} ${SUPERLINK_PORT} ${TLS_DIR}"
NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def _superlink_command() -> list[str]:
    [cmd] = [args for op, args in _instructions(DEPLOY / "Dockerfile.superlink") if op == "CMD"]
    return json.loads(cmd)


def _option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_superlink_image_listens_on_loopback_only():
    command = _superlink_command()
    assert ipaddress.ip_address(_option(command, "--host")).is_loopback, command
    assert "--insecure" not in command and "--enable-supernode-auth" in command
    assert not [
        args for op, args in _instructions(DEPLOY / "Dockerfile.superlink") if op == "EXPOSE"
    ]


def test_compose_publishes_the_fleet_proxy_alone_and_runs_flwr_beside_the_superlink():
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    link_port = _option(_superlink_command(), "--port")
    proxy = services["fleet-proxy"]
    env = proxy["environment"]
    # nginx in the SuperLink's network namespace reaches its loopback port and serves another
    assert proxy["network_mode"] == "service:superlink"
    assert env["SUPERLINK_PORT"] == link_port and env["FLEET_PROXY_LISTEN"] != link_port
    assert (
        "./fleet-proxy.conf.template:/etc/nginx/templates/default.conf.template:ro"
        in proxy["volumes"]
    )
    # the one published port is the proxy's (the superlink service owns the namespace)
    published = {name: s["ports"] for name, s in services.items() if "ports" in s}
    assert published == {"superlink": [f"127.0.0.1:{env['FLEET_PROXY_LISTEN']}:9093"]}
    assert env["FLEET_PROXY_LISTEN"] == "9093"
    # the sites' SuperLink address (the site image's default) is the proxy
    site_env = " ".join(
        args for op, args in _instructions(DEPLOY / "Dockerfile.site") if op == "ENV"
    )
    assert f"SUPERLINK=superlink:{env['FLEET_PROXY_LISTEN']}" in site_env.split()
    # the coordinator's flwr talks to the Control API on the SuperLink's loopback
    coordinator = services["coordinator"]
    assert coordinator["network_mode"] == "service:superlink"
    assert f"study 127.0.0.1:{link_port} /certs/ca.crt" in " ".join(coordinator["entrypoint"])


def test_fleet_proxy_template_forwards_the_fleet_api_alone():
    lines = [line.split("#")[0].strip() for line in TEMPLATE.read_text().splitlines()]
    lines = [line for line in lines if line]
    locations = [i for i, line in enumerate(lines) if line.startswith("location ")]
    assert [lines[i] for i in locations] == [
        "location ~ ^/v1/fleet/[a-z-]+$ {",
        "location / {",
    ]
    [forward] = [i for i, line in enumerate(lines) if line.startswith("proxy_pass ")]
    assert locations[0] < forward < locations[1]
    assert lines[locations[1] + 1 :] == ["return 404;", "}", "}"]


def _wait_port(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
            return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def _post(port: int, ca: Path, path: str, method: str = "POST") -> int:
    """The HTTP status for `path` sent exactly as written (no client-side normalisation)."""
    context = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
    try:
        conn.request(method, path, body=b"", headers={"Content-Type": "application/protobuf"})
        return conn.getresponse().status
    finally:
        conn.close()


def _nginx_config(tmp_path: Path, listen: str, link_port: int, certs: Path) -> Path:
    """The template through the runbook's envsubst, inside a minimal nginx.conf."""
    server = subprocess.run(
        ["envsubst", ENVSUBST_VARS],
        input=TEMPLATE.read_text(),
        env={"FLEET_PROXY_LISTEN": listen, "SUPERLINK_PORT": str(link_port), "TLS_DIR": str(certs)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (tmp_path / "fleet-proxy.conf").write_text(server)
    temp = "".join(
        f"{kind}_temp_path {tmp_path / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        ("user root;\n" if os.geteuid() == 0 else "")  # workers reach tmp_path (0700)
        + f"pid {tmp_path / 'nginx.pid'};\nerror_log {tmp_path / 'nginx-error.log'};\n"
        + "daemon off;\nevents {}\n"
        + f"http {{ access_log {tmp_path / 'nginx-access.log'}; {temp}\n"
        + f"include {tmp_path / 'fleet-proxy.conf'}; }}\n"
    )
    return conf


@pytest.mark.skipif(
    NGINX is None or shutil.which("envsubst") is None,
    reason="needs nginx and envsubst (apt-get install nginx-light gettext-base)",
)
def test_fleet_proxy_admits_a_supernode_and_refuses_the_control_api(tmp_path):
    certs, keys = tmp_path / "certs", tmp_path / "keys"
    made = _script(DEPLOY / "make-certs.sh", certs, "superlink", "127.0.0.1", "localhost")
    assert made.returncode == 0, made.stderr
    assert _script(DEPLOY / "make-node-key.sh", keys, "site-1").returncode == 0
    link_port, proxy_port = _free_port(), _free_port()
    homes = {name: tmp_path / f"{name}-home" for name in ("superlink", "site-1")}
    for home in homes.values():
        home.mkdir()
    clis = {}
    for via, port in (("direct", link_port), ("proxy", proxy_port)):
        clis[via] = tmp_path / f"cli-{via}"
        connected = _script(
            DEPLOY / "flwr-connection.sh", clis[via], "study", f"127.0.0.1:{port}", certs / "ca.crt"
        )
        assert connected.returncode == 0, connected.stderr
    conf = _nginx_config(tmp_path, f"127.0.0.1:{proxy_port}", link_port, certs)
    procs: list[subprocess.Popen] = []
    with contextlib.ExitStack() as stack:
        stack.callback(_stop, procs)
        procs.append(
            _start(
                _tls_superlink(certs, link_port),
                homes["superlink"],
                tmp_path / "superlink.log",
            )
        )
        nginx = [str(NGINX), "-e", str(tmp_path / "nginx-error.log"), "-p", str(tmp_path)]
        procs.append(_start([*nginx, "-c", str(conf)], tmp_path, tmp_path / "nginx.log"))
        deadline = time.monotonic() + 60
        _wait_port(link_port, deadline)
        _wait_port(proxy_port, deadline)

        # the Control API: through the proxy nothing, on the loopback port everything
        for command in (["supernode", "register", str(keys / "site-1.key.pub")], ["ls"]):
            answer = _flwr(clis["proxy"], *command, "study", "--format", "json")
            refused = json.loads(answer.stdout)
            assert refused["success"] is False and "404" in refused["error-message"], refused
        registered = subprocess.run(
            ["bash", str(DEPLOY / "register-sites.sh"), "study", str(keys / "site-1.key.pub")],
            env=_env(clis["direct"]),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert registered.returncode == 0, registered.stderr
        [(site, node_id)] = [line.split() for line in registered.stdout.splitlines()]

        # a real SuperNode, node key and all, comes online through the proxy
        procs.append(
            _start(
                [
                    str(BIN / "flower-supernode"),
                    "--superlink",
                    f"127.0.0.1:{proxy_port}",
                    "--root-certificates",
                    str(certs / "ca.crt"),
                    "--auth-supernode-private-key",
                    str(keys / "site-1.key"),
                    "--port",
                    str(_free_port()),
                ],
                homes["site-1"],
                tmp_path / "site-1.log",
            )
        )
        status, deadline = "", time.monotonic() + 60
        while status != "online" and time.monotonic() < deadline:
            listed = _flwr(clis["direct"], "supernode", "list", "study", "--format", "json")
            nodes = {str(n["node-id"]): n["status"] for n in json.loads(listed.stdout)["nodes"]}
            status = nodes.get(node_id, "")
            time.sleep(0.5)
        assert (site, status) == ("site-1", "online"), (tmp_path / "site-1.log").read_text()

        # every other path and spelling: 404 (or 403 for another method) at the proxy,
        # while the same control request reaches a route on the loopback port
        ca = certs / "ca.crt"
        assert _post(link_port, ca, "/v1/control/list-runs") != 404
        for path in (
            "/v1/control/list-runs",
            "/v1/runtime/acquire-task",
            "/v1/fleet/../control/list-runs",
            "/v1/fleet/%2e%2e/control/list-runs",
            "/v1/fleet/%2E%2E%2Fcontrol%2Flist-runs",
            "/v1/fleet//../control/list-runs",
            "/v1/fleet/pull-messages?x=/v1/control/list-runs",
            "/health",
            "/",
        ):
            assert _post(proxy_port, ca, path) == 404, path
        assert _post(proxy_port, ca, "/v1/fleet/pull-messages", "GET") == 403
