"""`fedsynth bench` prints measured ratios as JSON and refuses unknown keys in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

CLI = [sys.executable, "-m", "fedsynth.common.cli", "bench"]


SITE = 6  # subjects per measured site: small, so the tests stay fast


def bench_tiny(key: str) -> float:
    """One key measured by the CLI on the tiny preset."""
    proc = subprocess.run(
        [*CLI, "--config", "tiny", "--only", key, "--site-subjects", str(SITE), "--json"],
        capture_output=True,
        text=True,
    )
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


def test_a_bench_study_runs_the_first_k_of_its_sites():
    """Issue 15, item 4: a study of k sites delivers to and trains exactly sites 1..k in
    the measured round (the 3-site workspace of the tests above, 2 of its sites here)."""
    from fedsynth.common.config import load_config
    from fedsynth.simulations.bench import Bench, measured_round

    bench = Bench(load_config("tiny"), SITE)
    two = measured_round(bench, secure=True, sites=2)
    three = measured_round(bench, secure=True)
    assert (two.nodes, two.trained_sites) == ({1, 2}, 2)
    assert (three.nodes, three.trained_sites) == ({1, 2, 3}, 3)
    assert two.stages == three.stages == {"setup", "share_keys", "collect_masked_vectors", "unmask"}
    assert two.wire_bytes < three.wire_bytes
    assert measured_round(bench, secure=True, sites=3) is three  # the same study


@pytest.mark.slow
def test_site_scaling_ratios_come_from_studies_of_2_4_and_8_sites():
    """The scaling keys divide per-site round times of SecAgg+ studies that really trained
    2, 4 and 8 sites, drawn from one 8-site workspace (SITE < SCALING_SUBJECTS)."""
    from fedsynth.common.config import load_config
    from fedsynth.simulations import bench

    config = load_config("tiny")
    site = bench.Bench(config, SITE)
    four_over_two = bench.round_per_site_secagg_4_over_2(site)
    eight_over_two = bench.round_per_site_secagg_8_over_2(site)
    overhead = bench.round_overhead_secagg_8_sites(site)
    pool = bench.Bench(config, SITE, bench.SCALING_SITES[-1])
    two, four, eight = (bench.measured_round(pool, secure=True, sites=k) for k in (2, 4, 8))
    for k, measured in ((2, two), (4, four), (8, eight)):
        assert (measured.nodes, measured.trained_sites) == (set(range(1, k + 1)), k)
    per_site_two = two.round_seconds / 2
    assert four_over_two == pytest.approx((four.round_seconds / 4) / per_site_two)
    assert eight_over_two == pytest.approx((eight.round_seconds / 8) / per_site_two)
    assert overhead == eight.overhead and 0 <= overhead < 1


def test_a_study_of_more_sites_than_the_bench_has_is_refused():
    from fedsynth.common.config import load_config
    from fedsynth.common.errors import FedsynthError
    from fedsynth.simulations.bench import Bench, round_overhead

    with pytest.raises(FedsynthError, match="needs 2 to 3 sites, got 4"):
        round_overhead(Bench(load_config("tiny"), SITE), secure=True, sites=4)


def test_wider_and_larger_variants_change_only_width_or_volume():
    from fedsynth.common.config import load_config, to_dict
    from fedsynth.common.models import ConditionedUNet, latent_shape
    from fedsynth.simulations.bench import larger_volume, wider

    config = load_config("tiny")
    weights = sum(p.numel() for p in ConditionedUNet(config).parameters())
    for factor in (2, 4):
        wide = wider(config, factor)
        assert wide.unet.channels == tuple(factor * c for c in config.unet.channels)
        assert to_dict(wide)["data"] == to_dict(config)["data"]
        assert sum(p.numel() for p in ConditionedUNet(wide).parameters()) > 2 * weights
    large = larger_volume(config)
    assert large.data.shape == (64, 64, 16)
    assert large.unet == config.unet and large.autoencoder == config.autoencoder
    channels, *grid = latent_shape(large)
    assert channels == latent_shape(config)[0]
    assert [a // b for a, b in zip(grid, latent_shape(config)[1:], strict=True)] == [2, 2, 2]


def test_variant_ratios_divide_the_variant_by_the_default(monkeypatch):
    """Each scaling ratio is the variant's measured figure over the config's own (fixed
    figures here that depend on the width and the volume)."""
    from fedsynth.common.config import load_config
    from fedsynth.simulations import bench

    def figure(measured):
        config = measured.config
        return config.unet.channels[0] * config.data.shape[0] + 0.5 * measured.site_subjects

    monkeypatch.setattr(bench, "measured_steps", lambda b: {"dp_step_seconds": figure(b)})
    monkeypatch.setattr(bench, "site_peak_memory_mb", figure)
    config = load_config("tiny")
    site = bench.Bench(config, SITE)
    one = figure(site)
    for name, variant in {
        "width_2x_over_1x": lambda c: bench.wider(c, 2),
        "width_4x_over_1x": lambda c: bench.wider(c, 4),
        "64x64x16_over_default": bench.larger_volume,
    }.items():
        expected = figure(bench.Bench(variant(config), SITE)) / one
        assert bench.MEASURES[f"dp_step_{name}"](site) == pytest.approx(expected)
        assert bench.MEASURES[f"site_peak_memory_{name}"](site) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("key", "subset", "mode"),
    [
        ("dp_step_over_nonprivate_attention", "attention", "hooks"),
        ("dp_step_over_nonprivate_whole_unet", "all", "functorch"),
    ],
)
def test_subset_step_ratios_train_their_subset(key, subset, mode):
    """Each subset key times DP-SGD on that subset's weights, in its mode, against plain
    steps on the same weights; the norms default trains far fewer."""
    from fedsynth.client.dp_trainer import trainable_parameters
    from fedsynth.common.config import load_config
    from fedsynth.common.models import ConditionedUNet
    from fedsynth.simulations import bench

    site = bench.Bench(load_config("tiny", {"privacy.trainable": "norms"}), SITE)
    ratio = bench.MEASURES[key](site)
    variant = bench.trained_subset(site.config, subset)
    steps = bench.measured_steps(replace(site, config=variant))
    assert ratio == steps["dp_over_nonprivate"] > 1.0
    assert (steps["trainable"], steps["grad_sample_mode"]) == (subset, mode)
    weights = sum(p.numel() for p in trainable_parameters(ConditionedUNet(variant), subset))
    assert steps["trainable_parameters"] == weights
    assert weights > 2 * sum(
        p.numel() for p in trainable_parameters(ConditionedUNet(site.config), "norms")
    )


def test_dp_step_width_ratio_is_measured_once_per_config():
    """The 2x ratio is the two step timings kept for this run; the wider UNet's DP-SGD
    steps really train more weights at the same batch."""
    from fedsynth.common.config import load_config
    from fedsynth.simulations import bench

    config = load_config("tiny")
    site = bench.Bench(config, SITE)
    ratio = bench.dp_step_width_2x_over_1x(site)
    one = bench.measured_steps(site)
    two = bench.measured_steps(bench.Bench(bench.wider(config, 2), SITE))
    assert ratio == two["dp_step_seconds"] / one["dp_step_seconds"]
    assert bench.measured_steps(site) is one  # not measured again
    assert two["trainable_parameters"] > one["trainable_parameters"]
    assert two["subjects"] == one["subjects"]


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
        "dp_step_over_nonprivate, dp_step_over_nonprivate_attention, "
        "dp_step_over_nonprivate_whole_unet, round_overhead_plain, round_overhead_secagg, "
        "round_overhead_secagg_whole_unet, round_overhead_flwr_plain, "
        "round_overhead_flwr_secagg, round_bytes, round_bytes_whole_unet, "
        "round_per_site_secagg_4_over_2, round_per_site_secagg_8_over_2, "
        "round_overhead_secagg_8_sites, sampling_volumes_per_second, site_peak_memory_mb, "
        "dp_step_width_2x_over_1x, dp_step_width_4x_over_1x, dp_step_64x64x16_over_default, "
        "site_peak_memory_width_2x_over_1x, site_peak_memory_width_4x_over_1x, "
        "site_peak_memory_64x64x16_over_default)"
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


def test_a_spawned_peak_counts_the_child_not_its_parent():
    """A peak measured in a spawned process (`in_own_process`) is the child's own: Linux
    carries getrusage's ru_maxrss over from the parent through fork and exec, which made
    every site round measured after a 9 GiB one read 9 GiB."""
    import numpy as np
    import torch

    from fedsynth.common.config import load_config
    from fedsynth.simulations.bench import Bench, in_own_process, peak_mb
    from fedsynth.simulations.device_report import _sampling_peak_mb

    block = np.ones(2 * 2**30 // 8)  # 2 GiB, every page touched, in this process
    try:
        assert peak_mb(torch.device("cpu")) >= 2048
        child = in_own_process(_sampling_peak_mb, Bench(load_config("tiny"), SITE))
    finally:
        del block
    # torch, MONAI and a tiny UNet sampling two volumes: hundreds of MiB
    assert 100 < child < 1500
