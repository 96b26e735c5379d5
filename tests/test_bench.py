"""`fedsynth bench` prints measured ratios as JSON and refuses unknown keys in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "fedsynth.common.cli", "bench"]


SITE = 6  # subjects per measured site: small, so the tests stay fast


def bench_tiny(key: str) -> float:
    """One key measured by the CLI on the tiny preset."""
    proc = subprocess.run(
        [*CLI, "--config", "tiny", "--only", key, "--site-subjects", str(SITE), "--json"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)[key]


def test_ddim_speedup_is_measured_and_plausible():
    ratio = bench_tiny("ddim_speedup_over_ddpm")
    # tiny: 100 DDPM steps against 5 DDIM steps, the same network: about 20x less work; only
    # a loose bound, since a busy machine skews the short DDIM run
    assert ratio > 2


def test_sampling_throughput_counts_volumes_not_batches(monkeypatch):
    """Volumes per second = batches x batch size / their seconds (a fixed clock here)."""
    from fedsynth.common.config import load_config
    from fedsynth.simulations import bench

    calls = []

    def clock(work):
        calls.append(work())
        return 0.5  # seconds per batch

    monkeypatch.setattr(bench, "_seconds", clock)
    config = load_config("tiny", {"sampling.batch-size": 3, "sampling.steps": 2})
    assert bench.sampling_volumes_per_second(bench.Bench(config, SITE)) == 3 / 0.5
    # every timed batch decoded sampling.batch-size volumes of the configured shape
    assert len(calls) == bench.THROUGHPUT_BATCHES
    assert all(tuple(v.shape) == (3, 1, *config.data.shape) for v in calls)


def test_dp_step_ratio_and_site_memory_are_measured():
    # per-sample gradients, clipping and noise on top of the same forward and backward
    assert bench_tiny("dp_step_over_nonprivate") > 1.0
    # a fresh process holding torch, MONAI, Opacus and a tiny UNet: hundreds of MiB, not GiB
    assert 100 < bench_tiny("site_peak_memory_mb") < 4000


def test_round_overhead_plain_comes_out_of_the_cli():
    # tiny trains 2 local steps a round: most of the round is Flower and the study loop
    assert 0 <= bench_tiny("round_overhead_plain") < 1


def test_round_overhead_secagg_is_measured_with_secagg_on():
    from fedsynth.common.config import load_config
    from fedsynth.simulations.bench import Bench, round_overhead

    measured = round_overhead(Bench(load_config("tiny"), SITE), secure=True)
    assert measured.stages == {"setup", "share_keys", "collect_masked_vectors", "unmask"}
    assert 0 < measured.training_seconds < measured.round_seconds
    assert 0 <= measured.overhead < 1


def test_round_bytes_count_the_trainable_subset_against_the_whole_unet():
    """Issue 15, item 1: under SecAgg+ each site is sent the global tensors (float32) and
    answers a masked vector of as many values, so a round carries at least 2 x sites x
    4 bytes per travelling weight; the subset carries a fraction of the whole UNet's."""
    from fedsynth.common.config import load_config
    from fedsynth.common.models import ConditionedUNet, trainable_names
    from fedsynth.simulations.bench import OVERHEAD_SITES, Bench, measured_round

    config = load_config("tiny")
    bench = Bench(config, SITE)
    unet = ConditionedUNet(config)
    sizes = dict((k, p.numel()) for k, p in unet.named_parameters())
    subset = sum(sizes[k] for k in trainable_names(unet, config.privacy.trainable))
    whole = sum(p.numel() for p in unet.state_dict().values())
    assert subset < whole / 2
    small = measured_round(bench, secure=True).wire_bytes
    large = measured_round(bench, secure=True, whole_unet=True).wire_bytes
    assert 2 * OVERHEAD_SITES * 4 * subset <= small < 2 * OVERHEAD_SITES * 4 * whole <= large
    assert measured_round(bench, secure=True).wire_bytes == small  # measured once


def test_loopback_grid_leaves_out_a_dropped_sites_reply():
    from flwr.app import Message, RecordDict
    from flwr.clientapp import ClientApp

    from fedsynth.simulations.loopback import LoopbackGrid, drop_at, task_identity

    app = ClientApp()

    @app.train()
    def train(msg, context):
        return Message(RecordDict(), reply_to=msg)

    grid = LoopbackGrid(app, [1, 2, 3], drop=drop_at(2, "train"))
    with task_identity():
        sent = [grid.create_message(RecordDict(), "train", n, "1") for n in (1, 2, 3)]
        replies = grid.send_and_receive(sent)
        assert sorted(r.metadata.src_node_id for r in replies) == [1, 3]
        assert [d.replied for d in grid.deliveries] == [True, False, True]
        # once gone, the site stays gone
        again = grid.create_message(RecordDict(), "train", 2, "2")
        assert grid.send_and_receive([again]) == []


def test_unknown_key_is_one_line():
    proc = subprocess.run([*CLI, "--only", "nope", "--json"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "fedsynth bench: error: unknown bench key 'nope' (known: ddim_speedup_over_ddpm, "
        "dp_step_over_nonprivate, round_overhead_plain, round_overhead_secagg, "
        "round_overhead_secagg_whole_unet, round_overhead_flwr_plain, "
        "round_overhead_flwr_secagg, round_bytes, round_bytes_whole_unet, "
        "sampling_volumes_per_second, site_peak_memory_mb)"
    )


def test_a_bad_site_size_is_one_line():
    proc = subprocess.run([*CLI, "--site-subjects", "1"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "fedsynth bench: error: --site-subjects must be at least 2, got 1"


def test_training_time_is_the_union_of_the_sites_dp_sgd_within_the_rounds():
    from fedsynth.simulations.flwr_overhead import union_seconds

    sites = [(10.0, 20.0), (12.0, 25.0), (30.0, 35.0), (0.0, 4.0), (38.0, 50.0)]
    # overlap counted once (10-25), a gap (25-30) is overhead, clipped to the window
    assert union_seconds(sites, 5.0, 40.0) == pytest.approx(15 + 5 + 2)
    assert union_seconds([], 0.0, 10.0) == 0.0
    assert union_seconds([(1.0, 2.0), (1.5, 1.8)], 0.0, 10.0) == pytest.approx(1.0)  # nested


def test_an_overhead_needs_two_rounds(tmp_path):
    from fedsynth.common.errors import FedsynthError
    from fedsynth.simulations.flwr_overhead import run_overhead

    (tmp_path / "timing.json").write_text(
        json.dumps({"rounds": [{"round": 1, "started": 0, "replies": 1, "ended": 2}]})
    )
    with pytest.raises(FedsynthError, match="1 round"):
        run_overhead(tmp_path)
