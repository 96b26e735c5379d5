"""The ClientApp's outermost mod is all that stands between some site faults and the server.

A site whose own ledger is damaged fails at READY while reading it (common/ledger.py
raises with the ledger's path in its text, and nothing before the guard catches that).
The real ClientApp answers over a LoopbackGrid, which builds the error reply from the
exception's text as Flower does: the server must see only the fixed `fedsynth:internal`
reason, never the path (a folder name may be a patient or study id).
"""

from __future__ import annotations

import json
import logging

from test_study_rounds import _study

from fedsynth.client.budget import LEDGER
from fedsynth.client.client_app import app
from fedsynth.common.config import to_dict
from fedsynth.common.protocol import REASONS, code_of
from fedsynth.server.readiness import ready_sites
from fedsynth.server.site_identity import SiteNames
from fedsynth.simulations.loopback import LoopbackGrid, task_identity

SECRET = "patient-ZZ93"


def test_a_damaged_site_ledger_at_ready_reaches_the_server_as_a_reason_code_only(tmp_path, caplog):
    study = _study(tmp_path, 1, True)
    states = tmp_path / "states"
    nodes = {
        n: {
            "data-path": str(tmp_path / "data" / f"site-{n}"),  # not read at READY
            "state-dir": str(states / (f"{SECRET}-state" if n == 1 else f"site-{n}")),
            "site-name": f"site-{n}",
            "max-epsilon": 10,
        }
        for n in (1, 2)
    }
    damaged = states / f"{SECRET}-state" / LEDGER
    damaged.parent.mkdir(parents=True)
    damaged.write_text("not a ledger line\n")
    grid = LoopbackGrid(app, nodes)
    with caplog.at_level(logging.INFO), task_identity():
        picked = ready_sites(
            grid, study, SiteNames(study.run_dir, False), 1, json.dumps(to_dict(study.config))
        )
    assert picked == [2]  # the healthy site answers as usual
    [error] = [r.error for r in grid.received if r.metadata.src_node_id == 1]
    assert error is not None and code_of(error.reason) == "internal"
    assert "fedsynth:internal: " + REASONS["internal"] in error.reason
    assert SECRET not in error.reason and str(tmp_path) not in error.reason
    server = [r.getMessage() for r in caplog.records if r.name.startswith("fedsynth.server")]
    assert f"round 1: node 1 did not answer READY: {REASONS['internal']}" in server
    assert not [line for line in server if SECRET in line or str(tmp_path) in line]
    # the site's own log has the cause (the guard logs it there)
    site = [r for r in caplog.records if r.name == "fedsynth.client.client_app"]
    assert any("not a JSON ledger entry" in (r.exc_text or "") for r in site), site
