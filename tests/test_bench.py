"""`fedsynth bench` prints measured ratios as JSON and refuses unknown keys in one line.

Behaviour only: which code each key runs, in which order and what it reports; bounds on
measured values are loose enough for a busy machine (the spread is the bench's to show).
"""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import replace

import pytest

CLI = [sys.executable, "-m", "fedsynth.common.cli", "bench"]


SITE = 6  # subjects per measured site: small, so the tests stay fast
REPEATS = 2  # pairs (or measured rounds) per figure: few, so the tests stay fast


def bench_json(*keys: str) -> dict:
    """The CLI's JSON for these keys on the tiny preset."""
    only = [arg for key in keys for arg in ("--only", key)]
    sized = ["--repeats", str(REPEATS)]
    proc = subprocess.run(
        [*CLI, "--config", "tiny", *only, "--site-subjects", str(SITE), *sized, "--json"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def bench_tiny(key: str) -> float:
    """One key measured by the CLI on the tiny preset: its value (the median)."""
    return bench_json(key)[key]


@pytest.fixture
def short_blocks(monkeypatch):
    """blocked_autorange's blocks of 0.05 s: the sides' timing stays real, the test short."""
    from fedsynth.simulations import bench_timing

    monkeypatch.setattr(bench_timing, "BLOCK_S", 0.05)


def test_ddim_speedup_is_measured_and_plausible():
    ratio = bench_tiny("ddim_speedup_over_ddpm")
    # tiny: 100 DDPM steps against 5 DDIM steps, the same network: about 20x less work; only
    # a loose bound, since a busy machine skews the short DDIM run
    assert ratio > 2


def test_the_json_carries_each_figure_with_its_spread_repeats_and_hardware():
    """The old field holds the median; `figures` the median, quartiles, min, max, the
    pairs' ratios, their number and how they were measured; `hardware` what ran them."""
    out = bench_json("dp_step_over_nonprivate", "site_peak_memory_mb")
    step = out["figures"]["dp_step_over_nonprivate"]
    assert out["dp_step_over_nonprivate"] == step["median"]
    assert step["repeats"] == REPEATS == len(step["samples"])
    assert step["min"] <= step["q1"] <= step["median"] <= step["q3"] <= step["max"]
    assert "interleaved" in step["method"] and "warm-up" in step["method"]
    memory = out["figures"]["site_peak_memory_mb"]
    assert memory["repeats"] == 1 and "q1" not in memory  # measured once: no spread
    assert "VmHWM" in memory["method"] or "max_memory_allocated" in memory["method"]
    hardware = out["hardware"]
    assert {"platform", "cpu", "cores", "torch", "torch_threads", "device"} <= set(hardware)
    assert out["settings"] == {
        "config": "tiny",
        "overrides": [],
        "site_subjects": SITE,
        "repeats": REPEATS,
    }
    assert out["date"].count("-") == 2 and out["wall_seconds"] >= 0


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
    figure = bench.MEASURES["sampling_volumes_per_second"](bench.Bench(config, SITE))
    assert figure.samples == (3 / 0.5,) * bench.THROUGHPUT_BATCHES
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


def test_an_overhead_figure_has_one_sample_per_steady_round():
    """The overhead keys read rounds 2..R-1 of one study (round and training time of the
    same round, so no interleaving): `repeats` rounds measured, round 2's first."""
    from fedsynth.common.config import load_config
    from fedsynth.simulations import bench

    site = bench.Bench(load_config("tiny"), SITE, repeats=3)
    figure = bench.round_overhead_plain(site)
    study = bench.measured_round(site, secure=False, measured=3)
    assert len(study.steady) == figure.repeats == 3
    assert figure.samples == study.overheads and figure.samples[0] == study.overhead
    assert all(0 < training < seconds for seconds, training in study.steady)
    assert "rounds 2-4 of one in-process study of 5 rounds" in figure.method


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


def test_site_scaling_interleaves_fresh_studies_of_k_and_of_2_sites(monkeypatch):
    """Each scaling key runs SCALING_PAIRS pairs of fresh SecAgg+ studies, k sites and 2
    in ABBA order, from one 8-site pool of min(site, SCALING_SUBJECTS) subjects; each
    pair's ratio is the per-site round seconds of its k-site study over its 2-site one;
    the 8-site overhead has one sample per 8-site study (fixed round times here)."""
    from fedsynth.common.config import load_config
    from fedsynth.simulations import bench

    studies = []

    def study(pool, secure, whole_unet=False, sites=None, measured=1):
        studies.append((pool.sites, pool.site_subjects, secure, sites, measured))
        seconds = sites * (1.0 + 0.1 * len(studies))  # a load that keeps growing
        return bench.RoundOverhead(secure, seconds, seconds / 2, sites, frozenset(), frozenset(), 0)

    monkeypatch.setattr(bench, "round_overhead", study)
    monkeypatch.setattr(bench, "_SCALING", {})  # nothing measured earlier in this process
    site = bench.Bench(load_config("tiny"), 300)
    four = bench.round_per_site_secagg_4_over_2(site)
    assert [s[3] for s in studies] == [4, 2, 2, 4, 4, 2]  # A B, B A, A B
    assert {s[:3] + s[4:] for s in studies} == {(8, bench.SCALING_SUBJECTS, True, 1)}
    growth = [1.0 + 0.1 * n for n in range(1, 7)]
    assert four.samples == pytest.approx(
        [growth[0] / growth[1], growth[3] / growth[2], growth[4] / growth[5]]
    )
    assert four.repeats == bench.SCALING_PAIRS and "few pairs" in four.method
    studies.clear()
    overhead = bench.round_overhead_secagg_8_sites(site)
    assert [s[3] for s in studies] == [8, 2, 2, 8, 8, 2]
    assert overhead.samples == (0.5,) * bench.SCALING_PAIRS
    assert bench.round_per_site_secagg_8_over_2(site).repeats == bench.SCALING_PAIRS
    assert len(studies) == 6  # the 8-site key reused the studies of the overhead's


@pytest.mark.slow
def test_site_scaling_studies_train_2_4_and_8_sites():
    """The scaling studies really train 2, 4 and 8 sites of one 8-site workspace."""
    from fedsynth.common.config import load_config
    from fedsynth.simulations import bench

    pool = bench.scaling_pool(bench.Bench(load_config("tiny"), SITE))
    assert (pool.sites, pool.site_subjects) == (bench.SCALING_SITES[-1], SITE)
    for k in bench.SCALING_SITES:
        measured = bench.round_overhead(pool, True, sites=k)
        assert (measured.nodes, measured.trained_sites) == (set(range(1, k + 1)), k)
        assert 0 <= measured.overhead < 1
    four = bench.round_per_site_secagg_4_over_2(replace(pool, repeats=1))
    assert four.repeats == 1 and four.median > 0


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
    """Each scaling ratio is the variant's figure over the config's own: a DP step's
    seconds in interleaved pairs (a fixed clock here: each step's "seconds" depend on its
    width and volume), a peak measured once (fixed figures here)."""
    from fedsynth.common.config import load_config
    from fedsynth.simulations import bench, bench_timing
    from fedsynth.simulations.bench_steps import Step

    def figure(config, subjects):
        return config.unet.channels[0] * config.data.shape[0] + 0.5 * subjects

    @contextmanager
    def step(config, subjects, device):
        yield Step(lambda: figure(config, subjects), {})

    monkeypatch.setattr(bench, "dp_step", step)
    monkeypatch.setattr(bench_timing, "seconds", lambda work: work())  # its "seconds"
    monkeypatch.setattr(bench_timing, "blocked_seconds", lambda work: work())
    monkeypatch.setattr(bench, "site_peak_memory_mb", lambda b: figure(b.config, b.site_subjects))
    config = load_config("tiny")
    site = bench.Bench(config, SITE, repeats=3)
    subjects = bench._batch_subjects(site)
    one = figure(config, subjects)
    for name, variant in {
        "width_2x_over_1x": lambda c: bench.wider(c, 2),
        "width_4x_over_1x": lambda c: bench.wider(c, 4),
        "64x64x16_over_default": bench.larger_volume,
    }.items():
        timed = bench.MEASURES[f"dp_step_{name}"](site)
        assert timed.samples == pytest.approx([figure(variant(config), subjects) / one] * 3)
        peak = bench.MEASURES[f"site_peak_memory_{name}"](site)
        assert peak.samples == pytest.approx([figure(variant(config), SITE) / figure(config, SITE)])
        assert peak.repeats == 1 and "measured once" in peak.method


@pytest.mark.parametrize(
    ("key", "subset", "mode"),
    [
        ("dp_step_over_nonprivate_attention", "attention", "hooks"),
        ("dp_step_over_nonprivate_whole_unet", "all", "functorch"),
    ],
)
def test_subset_step_ratios_train_their_subset(key, subset, mode, short_blocks):
    """Each subset key times DP-SGD on that subset's weights, in its mode, against plain
    steps on the same weights; the norms default trains far fewer."""
    from fedsynth.client.dp_trainer import trainable_parameters
    from fedsynth.common.config import load_config
    from fedsynth.common.models import ConditionedUNet
    from fedsynth.simulations import bench

    site = bench.Bench(load_config("tiny", {"privacy.trainable": "norms"}), SITE, repeats=REPEATS)
    ratio = bench.MEASURES[key](site)
    variant = bench.trained_subset(site.config, subset)
    steps = bench.measured_steps(replace(site, config=variant))
    assert ratio is steps["figure"] and ratio.repeats == REPEATS and ratio.median > 1.0
    assert (steps["trainable"], steps["grad_sample_mode"]) == (subset, mode)
    weights = sum(p.numel() for p in trainable_parameters(ConditionedUNet(variant), subset))
    assert steps["trainable_parameters"] == weights
    assert weights > 2 * sum(
        p.numel() for p in trainable_parameters(ConditionedUNet(site.config), "norms")
    )


def test_dp_step_width_ratio_interleaves_the_wider_step_with_the_config_s_own(
    monkeypatch, short_blocks
):
    """The 2x ratio times real DP-SGD steps of the wider UNet and of the config's own,
    set up side by side: a warm-up of each, then pairs in ABBA order; the wider one
    really trains more weights at the same batch."""
    from fedsynth.common.config import load_config
    from fedsynth.simulations import bench
    from fedsynth.simulations.bench_steps import Step

    ran: list[tuple] = []
    real = bench.dp_step

    @contextmanager
    def recording(config, subjects, device):
        with real(config, subjects, device) as step:
            mark = (config.unet.channels, step.info["trainable_parameters"], step.info["subjects"])

            def run():
                if not ran or ran[-1] != mark:  # a side's block of calls counts once
                    ran.append(mark)
                return step.run()

            yield Step(run, step.info)

    monkeypatch.setattr(bench, "dp_step", recording)
    config = load_config("tiny")
    figure = bench.dp_step_width_2x_over_1x(bench.Bench(config, SITE, repeats=REPEATS))
    wide, one = sorted(set(ran), key=lambda m: m[1], reverse=True)
    assert ran == [wide, one, wide, one, wide]  # warm-up A B, then A B, B A
    assert wide[0] == tuple(2 * c for c in one[0]) and wide[1] > one[1]
    assert wide[2] == one[2]  # the same batch of subjects
    assert figure.repeats == REPEATS and len(figure.numerators) == REPEATS


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
