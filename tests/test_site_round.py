"""A site's round: trains and records before the update leaves; refuses when spent; resumes."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import fedsynth.client.site_round as site_round
from fedsynth.client.budget import LEDGER, BudgetRefusal
from fedsynth.client.latents import SiteLatents
from fedsynth.client.node_config import SiteSettings
from fedsynth.client.site_round import ModelMismatch, run_site_round
from fedsynth.common.accountant import epsilon
from fedsynth.common.checkpoint import load_pretrained, public_sha256
from fedsynth.common.config import load_config
from fedsynth.common.ledger import append_entry, read_ledger, spent_segments
from fedsynth.common.models import trainable_names

# 2 subjects at the site: delta must be below 1/2, and a batch of 1 is a rate of 0.5
STUDY = {
    "privacy.delta": 0.1,
    "privacy.batch-size": 1,
    "privacy.target-epsilon": 8.0,
    "federation.rounds": 3,
}


pytestmark = pytest.mark.usefixtures("one_thread")


def every_tensor(checkpoint) -> str:
    """The server's checkpoint-sha256 when it sends every UNet tensor (none frozen)."""
    return public_sha256(checkpoint, {}, [])


def settings(tmp_path, phantom_root, max_epsilon: float = 100.0, **terms) -> SiteSettings:
    """Site-1 of the phantoms; it publishes its exact count unless `terms` say otherwise."""
    terms = {"disclose_subject_count": True} | terms
    return SiteSettings("site-1", phantom_root / "site-1", tmp_path / "state", max_epsilon, **terms)


def test_a_round_trains_and_is_on_the_ledger_before_it_returns(
    tmp_path, phantom_root, tiny_checkpoint
):
    config = load_config("tiny", STUDY)
    weights = load_pretrained(tiny_checkpoint).unet.state_dict()
    (tmp_path / "state").mkdir(mode=0o755)  # made by hand, open to others
    os.chmod(tmp_path / "state", 0o755)
    update = run_site_round(
        settings(tmp_path, phantom_root),
        config,
        tiny_checkpoint,
        weights,
        1,
        seed=0,
        checkpoint_sha256=every_tensor(tiny_checkpoint),
    )
    assert update.result.steps == config.privacy.local_steps
    # the state dir is owner-only, and so is all it holds (latents decode to volumes)
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    held = {
        p.relative_to(tmp_path / "state").as_posix(): stat.S_IMODE(p.stat().st_mode)
        for p in (tmp_path / "state").rglob("*")
    }
    assert LEDGER in held and any(name.startswith("latents-") for name in held)
    assert any(name.startswith("optimizer/") for name in held)  # its kept AdamW moments
    assert {held[name] for name in held if (tmp_path / "state" / name).is_file()} == {0o600}
    assert {held[name] for name in held if (tmp_path / "state" / name).is_dir()} <= {0o700}
    assert any(not torch.equal(update.weights[k], weights[k]) for k in weights)
    [entry] = read_ledger(tmp_path / "state" / LEDGER)
    assert entry["round"] == 1 and entry["status"] == "trained" and entry["subjects"] == 2
    assert entry["sample_rate"] == 0.5 and entry["noise_multiplier"] > 0
    # the ledger line is what DP-SGD ran with (RoundResult reads Opacus' sampler/optimizer)
    used = update.result
    assert (used.noise_multiplier, used.sample_rate, used.steps) == (
        entry["noise_multiplier"],
        entry["sample_rate"],
        entry["steps"],
    )
    # the ledger's numbers give its epsilon back with the accountant
    assert epsilon(spent_segments([entry]), 0.1) == pytest.approx(entry["epsilon"])


def _subset(checkpoint, config):
    """What the server sends: the trainable subset (moved 0.5 off the checkpoint's values,
    as after rounds) and the SHA-256 of the checkpoint without it."""
    unet = load_pretrained(checkpoint).unet
    state, keys = unet.state_dict(), trainable_names(unet, config.privacy.trainable)
    sent = {k: state[k] + 0.5 for k in keys}
    return sent, public_sha256(checkpoint, state, [k for k in state if k not in sent]), state


def test_a_site_trains_the_sent_subset_on_its_own_copy_of_the_rest(
    tmp_path, phantom_root, tiny_checkpoint
):
    config = load_config("tiny", {**STUDY, "privacy.trainable": "norms"})
    sent, frozen, state = _subset(tiny_checkpoint, config)
    assert 0 < len(sent) < len(state) // 2  # the norms subset: a small part travels
    update = run_site_round(
        settings(tmp_path, phantom_root),
        config,
        tiny_checkpoint,
        sent,
        1,
        seed=0,
        checkpoint_sha256=frozen,
    )
    for key, value in state.items():  # the rest is the site's checkpoint, untouched
        if key not in sent:
            assert torch.equal(update.weights[key], value), key
    # trained from the sent values (0.5 above its own copy): one AdamW step of rate
    # 1e-2 moves each weight by about 1e-2
    assert any(not torch.equal(update.weights[k], sent[k]) for k in sent)
    assert all(float((update.weights[k] - sent[k]).abs().max()) < 0.1 for k in sent)


@pytest.mark.parametrize(
    "fault",
    [
        "another-unet",
        "another-statistics",
        "another-autoencoder",
        "subset-missing",
        "unknown-tensor",
        "wrong-shape",
        "wrong-type",
        "no-hash",
    ],
)
def test_weights_that_do_not_fit_the_sites_checkpoint_are_refused_before_anything_is_read(
    tmp_path, phantom_root, tiny_checkpoint, fault
):
    import shutil

    config = load_config("tiny", {**STUDY, "privacy.trainable": "norms"})
    sent, frozen, state = _subset(tiny_checkpoint, config)
    untrained = [k for k in state if k not in sent]
    if fault == "another-unet":  # one frozen weight differs at the server
        other = dict(state)
        other[untrained[0]] = state[untrained[0]] + 1e-3
        frozen = public_sha256(tiny_checkpoint, other, untrained)
    elif fault in ("another-statistics", "another-autoencoder"):  # the server's own copy
        server = tmp_path / "server-checkpoint"
        shutil.copytree(tiny_checkpoint, server)
        if fault == "another-statistics":
            metadata = json.loads((server / "metadata.json").read_text())
            metadata["latent_std"] = [v * 1.01 for v in metadata["latent_std"]]
            (server / "metadata.json").write_text(json.dumps(metadata))
        else:
            (server / "autoencoder.pt").write_bytes(b"x" + (server / "autoencoder.pt").read_bytes())
        frozen = public_sha256(server, state, untrained)
    elif fault == "subset-missing":
        sent.pop(next(iter(sent)))
        frozen = public_sha256(tiny_checkpoint, state, [k for k in state if k not in sent])
    elif fault == "unknown-tensor":
        sent["unet.extra.weight"] = torch.zeros(2)
    elif fault == "wrong-shape":
        key = next(iter(sent))
        sent[key] = torch.zeros(*sent[key].shape, 2)
    elif fault == "wrong-type":
        key = next(iter(sent))
        sent[key] = sent[key].double()
    else:
        frozen = ""  # a server that sends no hash
    with pytest.raises(ModelMismatch):
        run_site_round(
            settings(tmp_path, phantom_root),
            config,
            tiny_checkpoint,
            sent,
            1,
            seed=0,
            checkpoint_sha256=frozen,
        )
    held = [p.name for p in (tmp_path / "state").iterdir()]
    assert LEDGER not in held and not any(n.startswith("latents-") for n in held)


def test_an_exhausted_site_refuses_before_reading_data(tmp_path, phantom_root, tiny_checkpoint):
    config = load_config("tiny", STUDY)
    site = settings(tmp_path, phantom_root, max_epsilon=3.0)
    spent = {
        "round": 1,
        "site": "site-1",
        "noise_multiplier": 0.5,
        "sample_rate": 0.5,
        "steps": 50,
        "delta": 0.1,
        "epsilon": 9.0,
        "status": "trained",
    }
    append_entry(site.state_dir / LEDGER, spent)
    gone = SiteSettings(site.name, tmp_path / "no-such-folder", site.state_dir, 3.0)
    with pytest.raises(BudgetRefusal, match="site-1 has spent epsilon"):
        run_site_round(gone, config, tiny_checkpoint, {}, 2)
    assert len(read_ledger(site.state_dir / LEDGER)) == 1


ROUNDS = """
import sys, torch
from pathlib import Path
from fedsynth.client.node_config import SiteSettings
from fedsynth.client.site_round import run_site_round
from fedsynth.common.checkpoint import load_pretrained, public_sha256
from fedsynth.common.config import load_config
torch.set_num_threads(1)
checkpoint, data, state, first = sys.argv[1:5]
config = load_config("tiny", {STUDY!r})
site = SiteSettings("site-1", Path(data), Path(state), 100.0)
weights = load_pretrained(checkpoint).unet.state_dict()
sha = public_sha256(Path(checkpoint), {}, [])  # every tensor sent
for r in range(int(first), 4):
    weights = run_site_round(
        site, config, checkpoint, weights, r, seed=r, checkpoint_sha256=sha
    ).weights
"""


def run_rounds(checkpoint, data, state, first: int) -> subprocess.Popen:
    script = textwrap.dedent(ROUNDS).replace("{STUDY!r}", repr(STUDY))
    args = [sys.executable, "-c", script, str(checkpoint), str(data), str(state), str(first)]
    return subprocess.Popen(args, env=os.environ | {"OMP_NUM_THREADS": "1"})


def test_a_killed_site_keeps_its_spend(tmp_path, phantom_root, tiny_checkpoint):
    data = phantom_root / "site-1"
    assert run_rounds(tiny_checkpoint, data, tmp_path / "whole", 1).wait(timeout=300) == 0
    whole = read_ledger(tmp_path / "whole" / LEDGER)

    ledger = tmp_path / "killed" / LEDGER
    proc = run_rounds(tiny_checkpoint, data, tmp_path / "killed", 1)
    deadline = time.monotonic() + 300
    while len(read_ledger(ledger)) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # mid-way through round 2 (or 3)
    proc.wait()
    done = len(read_ledger(ledger))
    assert 1 <= done < 3, "killed too late to test a restart"
    assert run_rounds(tiny_checkpoint, data, tmp_path / "killed", done + 1).wait(timeout=300) == 0
    resumed = read_ledger(ledger)
    assert [e["round"] for e in resumed] == [1, 2, 3]  # nothing forgotten, nothing twice
    assert [e["epsilon"] for e in resumed] == pytest.approx([e["epsilon"] for e in whole])
    assert json.loads(ledger.read_text().splitlines()[-1])["epsilon"] <= 8.0


def test_a_site_too_large_for_secure_aggregation_stops_before_training_or_spending(
    tmp_path, phantom_root, tiny_checkpoint
):
    from fedsynth.common.errors import FedsynthError

    config = load_config("tiny", STUDY)
    weights = load_pretrained(tiny_checkpoint).unet.state_dict()
    with pytest.raises(
        FedsynthError, match=r"weight \(2 subjects\) exceeds .* max weight 1: raise"
    ):
        run_site_round(
            settings(tmp_path, phantom_root),
            config,
            tiny_checkpoint,
            weights,
            1,
            seed=0,
            max_subjects=1,
            checkpoint_sha256=every_tensor(tiny_checkpoint),
        )
    assert read_ledger(tmp_path / "state" / LEDGER) == []  # nothing spent
    run_site_round(
        settings(tmp_path, phantom_root),
        config,
        tiny_checkpoint,
        weights,
        1,
        seed=0,
        max_subjects=2,
        checkpoint_sha256=every_tensor(tiny_checkpoint),
    )
    assert len(read_ledger(tmp_path / "state" / LEDGER)) == 1


def tiled(site: SiteLatents, subjects: int) -> SiteLatents:
    """`site`'s subjects repeated (volumes and all) to `subjects` subjects."""
    rows = [(site.subjects == k % site.n_subjects).nonzero().flatten() for k in range(subjects)]
    index = torch.cat(rows)
    ids = torch.cat([torch.full((len(r),), k) for k, r in enumerate(rows)])
    return SiteLatents(site.latents[index], site.attributes[index], ids)


@pytest.fixture
def site_of_347(monkeypatch):
    """Site-1 with 347 subjects (its phantoms tiled): not a round number."""
    real = site_round.site_latents

    def latents(*args, **kwargs) -> SiteLatents:
        return tiled(real(*args, **kwargs), 347)

    monkeypatch.setattr(site_round, "site_latents", latents)


LARGE_SITE = {"privacy.batch-size": 4, "privacy.delta": 1e-5, "federation.rounds": 3}


@pytest.mark.usefixtures("site_of_347")
@pytest.mark.parametrize(
    ("terms", "published"),
    [
        ({"disclose_subject_count": False}, 340),  # the default: rounded down
        ({"disclose_subject_count": False, "public_subjects": 100, "max_delta": 1e-5}, 100),
        ({"disclose_subject_count": True}, 347),  # opted in: as before
    ],
    ids=["rounded", "declared", "disclosed"],
)
def test_a_site_samples_at_its_public_size_and_its_ledger_is_exact_there(
    tmp_path, phantom_root, tiny_checkpoint, terms, published
):
    """A site of 347 subjects plans q = batch / m from its public size m and weighs its
    update by m; Opacus' sampler really runs at that q, and the ledger's epsilon is the
    accountant's at it."""
    config = load_config("tiny", LARGE_SITE)
    update = run_site_round(
        settings(tmp_path, phantom_root, **terms),
        config,
        tiny_checkpoint,
        load_pretrained(tiny_checkpoint).unet.state_dict(),
        1,
        seed=0,
        checkpoint_sha256=every_tensor(tiny_checkpoint),
    )
    assert update.plan.subjects == published  # the FedAvg weight the reply carries
    assert update.plan.sample_rate == 4 / published
    assert update.result.sample_rate == 4 / published  # the UniformWithReplacementSampler's
    [entry] = read_ledger(tmp_path / "state" / LEDGER)
    assert entry["sample_rate"] == 4 / published and entry["subjects"] == published
    assert entry["epsilon"] == pytest.approx(epsilon(spent_segments([entry]), 1e-5), rel=1e-12)


@pytest.mark.usefixtures("site_of_347")
@pytest.mark.parametrize(
    ("declared", "max_delta", "reason"),
    [
        (348, 1e-5, "public-subjects=348 exceeds the site's 347 subjects"),
        # max-delta not below 1/347 (2.88e-3): refused whatever delta the study asks
        (100, 3e-3, "needs a max-delta below 1/n = 0.00288 for the site's 347 subjects"),
        (100, None, "needs a max-delta below 1/n = 0.00288 for the site's 347 subjects"),
    ],
    ids=["above-count", "max-delta-too-large", "no-max-delta"],
)
def test_a_declared_size_that_does_not_fit_the_real_count_is_refused_without_the_count(
    tmp_path, phantom_root, tiny_checkpoint, declared, max_delta, reason
):
    from fedsynth.common.protocol import SiteStop

    terms = {"disclose_subject_count": False, "public_subjects": declared, "max_delta": max_delta}
    with pytest.raises(SiteStop) as stop:
        run_site_round(
            settings(tmp_path, phantom_root, **terms),
            load_config("tiny", LARGE_SITE),
            tiny_checkpoint,
            load_pretrained(tiny_checkpoint).unet.state_dict(),
            1,
            seed=0,
            checkpoint_sha256=every_tensor(tiny_checkpoint),
        )
    assert stop.value.code == "config" and "347" not in str(stop.value)  # what leaves
    assert read_ledger(tmp_path / "state" / LEDGER) == []  # nothing trained or spent
    log = (tmp_path / "state" / "site.log").read_text()  # the reason stays at the site
    assert reason in log
