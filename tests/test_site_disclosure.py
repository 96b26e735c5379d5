"""Nothing computed from site data reaches the server but the DP-SGD update and the spend.

A study in process (real ServerApp loop, real ClientApp, real sites over a LoopbackGrid):
site-1 and site-2 are healthy; site-3's data folder and files carry a patient-like id and
its round fails in three ways (its data unreadable; an exception whose text holds a path
and a value; an update that cannot be sent). Every message the server received and every
line it printed is searched for the id, the path, the value and site-3's subject count.
"""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from flwr.app import Context, RecordDict

import fedsynth.client.site_round as site_round
from fedsynth.client.client_app import app, site_round_reply
from fedsynth.common.protocol import REPLY_METRICS, SiteStop
from fedsynth.server.server_app import run_federation
from fedsynth.server.study import prepare
from fedsynth.simulations.loopback import LoopbackGrid, task_identity

pytestmark = pytest.mark.usefixtures("one_thread")
SECRET = "patient-ZZ93"
VALUE = "123.4567"


@pytest.fixture(scope="module")
def three_sites(tmp_path_factory):
    from fedsynth.simulations.phantoms import generate_cohorts

    root = tmp_path_factory.mktemp("disclosure")
    generate_cohorts(root, sites=3, subjects=3, seed=3, public_subjects=1, progress=False)
    secret = root / f"{SECRET}-site"
    shutil.copytree(root / "site-3", secret)
    return root, secret


def _study(tmp_path, root, secret, checkpoint, monkeypatch, fault):
    run_config = {
        "config": "tiny",
        "run-dir": str(tmp_path / "run"),
        "checkpoint": str(checkpoint),
        "secagg-max-weight": 10,
        "federation.rounds": 1,
        "federation.sites": 3,
        "federation.sites-per-round": 3,
        "federation.secure-aggregation": True,
    }
    nodes = {
        n: {
            "data-path": str(root / f"site-{n}") if n < 3 else str(secret),
            "state-dir": str(tmp_path / "states" / f"site-{n}"),
            "max-epsilon": 10,
            "site-name": f"site-{n}",
        }
        for n in (1, 2, 3)
    }
    if fault == "data":  # every volume of the site unreadable
        for image in secret.glob("**/*.nii*"):
            image.write_bytes(b"not a NIfTI " + SECRET.encode())
    real_train = site_round.train_round

    def train(unet, *args, **kwargs):
        if fault == "exception" and kwargs.get("seed") is None and _is_secret(unet):
            raise RuntimeError(f"value {VALUE} in {secret}/{SECRET}.nii.gz")
        result = real_train(unet, *args, **kwargs)
        if fault == "update" and _is_secret(unet):
            with torch.no_grad():
                next(unet.parameters()).fill_(float("nan"))
        return result

    current = {}

    def _is_secret(_unet) -> bool:
        return current.get("node") == 3

    monkeypatch.setattr(site_round, "train_round", train)
    study = prepare(run_config)
    grid = LoopbackGrid(app, nodes)
    deliver = grid.app

    def tracking(message, context):
        current["node"] = context.node_id
        return deliver(message, context)

    grid.app = tracking
    with task_identity():
        summary = run_federation(grid, study, Context(1, 0, {}, RecordDict(), {}))
    return summary, grid


@pytest.mark.parametrize("fault", ["data", "exception", "update"])
def test_a_failing_site_discloses_no_path_value_or_count(
    tmp_path, monkeypatch, caplog, three_sites, tiny_checkpoint, fault
):
    root, secret = three_sites
    secret = shutil.copytree(secret, tmp_path / secret.name)
    summary, grid = _study(tmp_path, root, secret, tiny_checkpoint, monkeypatch, fault)
    assert summary["rounds_done"] == 1
    assert set(summary["site_epsilon"]) >= {"site-1", "site-2"}
    # what the replies say in clear: metrics and configs (the arrays are the DP-noised
    # deltas; their random bytes would hold "347" by chance)
    server_side = [
        repr(
            [
                dict(r)
                for r in (*m.content.metric_records.values(), *m.content.config_records.values())
            ]
        )
        if m.has_content()
        else repr(m.error)
        for m in grid.received
    ]
    # every record but the sites' own (they share this process: fedsynth.client.* is
    # theirs, kept at the site); in deployment Flower uploads all the ServerApp writes
    server_log = [
        r.getMessage() for r in caplog.records if not r.name.startswith("fedsynth.client")
    ]
    assert any("round 1/1" in line for line in server_log)  # the server's log was seen
    server_side += server_log
    text = "\n".join(server_side)
    assert "fedsynth:" in text or "site-3" in text  # the failure did reach the server...
    for leak in (SECRET, VALUE, str(secret), "NIfTI", "Traceback"):
        assert leak not in text, leak  # ...as a reason code only
    # the site's own log holds the details
    log = (tmp_path / "states" / "site-3" / "site.log").read_text()
    assert {"data": "data: ", "exception": SECRET, "update": "non-finite values"}[fault] in log


def test_a_trained_reply_carries_exactly_the_allowed_metrics(
    tmp_path, tiny_checkpoint, three_sites
):
    """Issue 16, item 7: the metrics travel in clear under SecAgg+ too."""
    import json

    from fedsynth.common.checkpoint import load_pretrained, public_sha256
    from fedsynth.common.config import load_config, to_dict
    from fedsynth.common.models import trainable_names

    root, _ = three_sites
    config = load_config("tiny")
    unet = load_pretrained(tiny_checkpoint).unet
    state, keys = unet.state_dict(), trainable_names(unet, config.privacy.trainable)
    weights = {k: state[k] for k in keys}  # the subset, as the server sends it
    frozen = public_sha256(tiny_checkpoint, state, [k for k in state if k not in keys])
    sent = {
        "round": 1,
        "study": json.dumps(to_dict(config)),
        "study-id": "s",
        "checkpoint": str(tiny_checkpoint),
        "checkpoint-sha256": frozen,
    }
    node = {
        "data-path": str(root / "site-1"),
        "state-dir": str(tmp_path / "s"),
        "max-epsilon": 10,
        "site-name": "site-1",
    }
    # a server whose checkpoint differs: the fixed reason code, nothing spent or marked
    with pytest.raises(SiteStop, match=r"^fedsynth:model: "):
        site_round_reply(weights, {**sent, "checkpoint-sha256": "0" * 64}, node, secure=True)
    held = {p.name for p in (tmp_path / "s").iterdir()}
    assert "ledger.jsonl" not in held and "failed.json" not in held
    delta, subjects, metrics = site_round_reply(weights, sent, node, secure=True)
    assert set(delta) == set(keys)  # only the subset goes back
    assert set(metrics) == REPLY_METRICS
    # 3 subjects, published as 1 (below 10: n rounded down to a multiple of 10 is 0)
    assert subjects == metrics["subjects"] == 1 and metrics["sample_rate"] == 1.0


def _tiled(site, subjects: int):
    """`site`'s subjects repeated (volumes and all) to `subjects` subjects."""
    from fedsynth.client.latents import SiteLatents

    rows = [(site.subjects == k % site.n_subjects).nonzero().flatten() for k in range(subjects)]
    ids = torch.cat([torch.full((len(r),), k) for k, r in enumerate(rows)])
    index = torch.cat(rows)
    return SiteLatents(site.latents[index], site.attributes[index], ids)


@pytest.mark.parametrize("disclose", [False, True], ids=["default", "opted-in"])
def test_a_sites_exact_count_reaches_the_release_only_when_it_opts_in(
    tmp_path, monkeypatch, caplog, three_sites, tiny_checkpoint, disclose
):
    """Site-3 has 347 subjects. By default nothing the server receives, logs, keeps in its
    ledger or publishes in privacy.json gives 347: the weight is 340 and every sample
    rate is batch / 340. With disclose-subject-count=true, 347 as before."""
    import json

    from fedsynth.common.ledger import read_ledger
    from fedsynth.server.finished_study import read_finished_study
    from fedsynth.server.privacy_statement import privacy_statement

    root, _ = three_sites
    real = site_round.site_latents

    def latents(pretrained, checkpoint, data_path, *args, **kwargs):
        site = real(pretrained, checkpoint, data_path, *args, **kwargs)
        return _tiled(site, 347) if data_path.name == "site-3" else site

    monkeypatch.setattr(site_round, "site_latents", latents)
    run_config = {
        "config": "tiny",
        "run-dir": str(tmp_path / "run"),
        "checkpoint": str(tiny_checkpoint),
        "secagg-max-weight": 400,
        "federation.rounds": 1,
        "federation.sites": 3,
        "federation.sites-per-round": 3,
        "federation.secure-aggregation": True,
    }
    nodes = {
        n: {
            "data-path": str(root / f"site-{n}"),
            "state-dir": str(tmp_path / "states" / f"site-{n}"),
            "max-epsilon": 10,
            "site-name": f"site-{n}",
        }
        | ({"disclose-subject-count": "true"} if disclose and n == 3 else {})
        for n in (1, 2, 3)
    }
    grid = LoopbackGrid(app, nodes)
    with task_identity():
        summary = run_federation(grid, prepare(run_config), Context(1, 0, {}, RecordDict(), {}))
    assert summary["rounds_done"] == 1 and "site-3" in summary["site_epsilon"]
    statement = privacy_statement(read_finished_study(tmp_path / "run"), 3, False)
    ledger = read_ledger(tmp_path / "run" / "ledger.jsonl")
    published = 347 if disclose else 340
    [line] = [e for e in ledger if e["site"] == "site-3"]
    assert line["sample_rate"] == 4 / published
    assert statement["sites"]["site-3"]["sample_rates"] == [4 / published]
    assert "public size" in statement["sites"]["site-3"]["subject_count"]
    # what the replies say in clear: metrics and configs (the arrays are the DP-noised
    # deltas; their random bytes would hold "347" by chance)
    server_side = [
        repr(
            [
                dict(r)
                for r in (*m.content.metric_records.values(), *m.content.config_records.values())
            ]
        )
        if m.has_content()
        else repr(m.error)
        for m in grid.received
    ]
    server_side += [
        r.getMessage() for r in caplog.records if not r.name.startswith("fedsynth.client")
    ]
    text = "\n".join(
        [*server_side, (tmp_path / "run" / "ledger.jsonl").read_text(), json.dumps(statement)]
    )
    # the weight as a whole number (not inside a hex id or hash), or a rate of batch / 347
    leaks = [re.search(r"(?<![\w.])347(?![\w])", text), repr(4 / 347) in text]
    assert any(leaks) == disclose, leaks
    assert repr(4 / published) in text
