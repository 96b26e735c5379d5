"""fedsynth evaluate: every metric ranks cohorts the way it must, and the CLI refuses cleanly.

Stand-ins for cohorts, all at the model's shape (32x32x8): public phantoms from other
seeds ("two real samples of one distribution"), a site whose scanner is shifted (4x the
noise, more blur and bias field), pure noise, and copies of one volume.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fedsynth.common.anatomy import load_labelled, meter_path, train_volume_meter
from fedsynth.common.checkpoint import CONFIG, save_torch
from fedsynth.common.cli import main
from fedsynth.common.config import load_config, to_yaml
from fedsynth.common.data import check_site, open_site, scale_attributes
from fedsynth.common.evaluate_cmd import table
from fedsynth.common.evaluation import (
    UTILITY_STEPS,
    evaluate_cohort,
    fidelity,
    frechet_distance,
    kernel_mmd,
    lv_cavity_ml,
    mean_pairwise_ms_ssim,
    ms_ssim_settings,
    split_subjects,
    train_and_test,
)
from fedsynth.common.feature_net import (
    FEATURE_NET,
    ensure_feature_net,
    feature_net_path,
    load_feature_nets,
    train_feature_nets,
)
from fedsynth.common.io import atomic_write_text
from fedsynth.common.orientation import short_axis_affine
from fedsynth.simulations import phantoms

SUBJECTS = 8  # per set: 16 volumes (ED and ES)
FEATURE_STEPS = 30
UTILITY_TEST_STEPS = 60
SHIFTED_SCANNER = {"noise": 0.2, "psf": 2.0, "bias": 0.5}  # public: 0.05, 1.0, 0.25


def write_phantoms(folder: Path, profile: phantoms.SiteProfile, seed: int) -> Path:
    """SUBJECTS phantom subjects of `profile` (both phases, with label maps) and a manifest."""
    rows = []
    for i in range(1, SUBJECTS + 1):
        subject = phantoms.make_subject(profile, phantoms.subject_rng(seed, 0, i))
        rows += phantoms.write_subject(folder, f"sub-{i:03d}", f"s{seed}-sub-{i:03d}", subject)
    atomic_write_text(folder / "manifest.csv", phantoms.manifest_text(rows))
    return folder


def write_cohort(folder: Path, volumes: torch.Tensor, rows: list[dict], subjects: list[str]):
    """Volumes (N, 1, H, W, D) as a synthetic cohort folder: NIfTI at the model's shape in
    the short-axis frame, manifest.csv with image, subject and the attribute columns."""
    config = load_config("tiny")
    names = [a.name for a in config.data.attributes]
    folder.mkdir(parents=True)
    with (folder / "manifest.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "subject", *names])
        for k, (volume, row, subject) in enumerate(zip(volumes, rows, subjects, strict=True)):
            array = volume[0].numpy().astype(np.float32)
            affine = short_axis_affine(config.data.spacing, array.shape)
            nib.save(nib.Nifti1Image(array, affine), folder / f"syn-{k:04d}.nii.gz")
            writer.writerow([f"syn-{k:04d}.nii.gz", subject, *(f"{row[n]:g}" for n in names)])
    return folder


def load(folder: Path):
    """(volumes, attribute rows, subjects) of a folder read as the model sees it."""
    data = load_config("tiny").data
    dataset, manifest = open_site(folder, data, show_progress=False)
    volumes = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return (
        volumes,
        [dict(r.attributes) for r in manifest.records],
        [r.subject for r in manifest.records],
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Phantom sets, a checkpoint folder (config, feature nets, anatomy meter) trained on
    the 'train' set, and cohort folders built from the other sets."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("evaluation")
    shifted = dataclasses.replace(phantoms.PUBLIC, name="shifted", **SHIFTED_SCANNER)
    sets = {
        "train": write_phantoms(root / "train", phantoms.PUBLIC, 10),
        "real": write_phantoms(root / "real", phantoms.PUBLIC, 11),
        "same": write_phantoms(root / "same", phantoms.PUBLIC, 12),
        "shifted": write_phantoms(root / "shifted", shifted, 13),
    }
    config = load_config("tiny", {"training.feature-steps": FEATURE_STEPS})
    checkpoint = root / "checkpoint"
    checkpoint.mkdir()
    atomic_write_text(checkpoint / CONFIG, to_yaml(config))
    loaded = {name: load(folder) for name, folder in sets.items()}
    volumes, rows, _ = loaded["train"]
    scaled = torch.from_numpy(np.stack([scale_attributes(r, config.data.attributes) for r in rows]))
    ensure_feature_net(checkpoint, sets["train"], config, False, (volumes, scaled))
    manifest = check_site(sets["train"], config.data, read_images=False, show_progress=False)
    labelled = load_labelled(manifest, config.data, False, volumes)
    meter = train_volume_meter(*labelled, steps=25, seed=0, show_progress=False)
    save_torch(meter_path(checkpoint), meter.state())
    noise = torch.rand(16, 1, 32, 32, 8, generator=torch.Generator().manual_seed(0))
    loaded["noise"] = (noise, loaded["same"][1], loaded["same"][2])
    copies = loaded["same"][0][:1].repeat(6, 1, 1, 1, 1)
    loaded["copies"] = (copies, loaded["same"][1][:6], loaded["same"][2][:6])
    cohorts = {
        name: write_cohort(root / "cohorts" / name, *loaded[name])
        for name in ("same", "shifted", "noise")
    }
    rows = loaded["same"][1]
    order = np.random.default_rng(0).permutation(len(rows))
    shuffled = [rows[k] for k in order]
    subjects = [loaded["same"][2][k] for k in order]  # a subject's rows keep its sex and age
    cohorts["shuffled"] = write_cohort(
        root / "cohorts" / "shuffled", loaded["same"][0], shuffled, subjects
    )
    yield {
        "root": root,
        "sets": sets,
        "checkpoint": checkpoint,
        "loaded": loaded,
        "cohorts": cohorts,
        "order": order,
    }
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------- fidelity


def test_feature_nets_are_saved_once_and_read_back(world):
    path = feature_net_path(world["checkpoint"])
    nets = load_feature_nets(world["checkpoint"])
    assert nets.info["steps"] == FEATURE_STEPS and nets.info["public_volumes"] == 16
    assert path.stat().st_mode & 0o777 == 0o644
    volumes = world["loaded"]["real"][0][:3]
    assert nets.volume_features(volumes).shape == (3, 32)
    slices = nets.slice_features(volumes)
    assert slices.shape == (24, 32)
    # volume-major: row i*D + k is slice k of volume i
    one = nets.slice_features(volumes[1:2])
    torch.testing.assert_close(slices[8:16], one)
    # trained, not initial weights: the 3D features predict attributes better than chance
    assert nets.info["final_loss"]["3d"] < 0.05, nets.info
    # present: nothing is retrained (the file is untouched)
    before = path.stat().st_mtime_ns
    config = load_config("tiny", {"training.feature-steps": 1})
    assert ensure_feature_net(world["checkpoint"], world["sets"]["train"], config, False)
    assert path.stat().st_mtime_ns == before


def test_feature_net_training_is_seeded(world):
    volumes, _, _ = world["loaded"]["real"]
    attributes = torch.rand(len(volumes), 13, generator=torch.Generator().manual_seed(0))
    a, _ = train_feature_nets(volumes, attributes, 2, seed=5, show_progress=False)
    b, _ = train_feature_nets(volumes, attributes, 2, seed=5, show_progress=False)
    c, _ = train_feature_nets(volumes, attributes, 2, seed=6, show_progress=False)
    torch.testing.assert_close(a.volume_features(volumes), b.volume_features(volumes))
    torch.testing.assert_close(a.slice_features(volumes), b.slice_features(volumes))
    assert not torch.allclose(a.volume_features(volumes), c.volume_features(volumes))


@pytest.mark.parametrize("space", ["3d", "2d"])
@pytest.mark.parametrize("metric", ["frechet_distance", "mmd2"])
def test_fidelity_ranks_same_distribution_below_shifted_site_below_noise(world, space, metric):
    nets = load_feature_nets(world["checkpoint"])
    features = nets.volume_features if space == "3d" else nets.slice_features
    real = features(world["loaded"]["real"][0])
    value = {
        name: fidelity(real, features(world["loaded"][name][0]), seed=0)[metric]
        for name in ("same", "shifted", "noise")
    }
    assert value["same"] < value["shifted"] < value["noise"], value
    # clear margins, not a tie broken by chance
    assert value["shifted"] > 1.5 * max(value["same"], 0.01), value
    assert value["noise"] > 1.5 * value["shifted"], value


def test_frechet_distance_matches_the_closed_form():
    """Commuting covariances: FD = |m1 - m2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2))."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(20000, 3, generator=generator, dtype=torch.float64) * 2 + 1
    expected = 3 * 1.0 + 3 * (1 + 4 - 2 * 2)  # mean shift 1 per axis; std 1 vs 2
    value, note = frechet_distance(x, y)
    assert value == pytest.approx(expected, rel=0.03) and note is None


def test_mmd_is_a_gaussian_kernel_mmd_not_a_mean_difference():
    """Equal means, different spread: a linear kernel (MONAI's alone) sees nothing."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 4, generator=generator, dtype=torch.float64)
    y = 3 * torch.randn(300, 4, generator=generator, dtype=torch.float64)
    z = torch.randn(300, 4, generator=generator, dtype=torch.float64)
    result = kernel_mmd(x, y, seed=0)
    # the unbiased MMD^2 with the exact Gaussian kernel at the same bandwidth
    kernel = lambda a, b: torch.exp(-(torch.cdist(a, b) ** 2) / (2 * result["bandwidth"] ** 2))  # noqa: E731
    m = len(x)
    exact = (
        (kernel(x, x).sum() - m) / (m * (m - 1))
        + (kernel(y, y).sum() - m) / (m * (m - 1))
        - 2 * kernel(x, y).mean()
    )
    assert result["mmd2"] == pytest.approx(float(exact), abs=0.01)
    assert result["mmd2"] > 0.2
    assert abs(kernel_mmd(x, z, seed=0)["mmd2"]) < 0.02
    # sets of different sizes: averaged over equal-size subsets, same answer on average
    uneven = kernel_mmd(x, y[:100], seed=0)
    assert uneven["subsets"] == 10 and uneven["mmd2"] == pytest.approx(result["mmd2"], abs=0.05)


# --------------------------------------------------------------------------------- diversity


@pytest.mark.parametrize(
    "shape, scales, kernel",
    [
        ((32, 32, 8), 3, [7, 7, 1]),
        ((96, 96, 13), 3, [11, 11, 3]),
        ((32, 32, 4), 2, [11, 11, 1]),
        ((4, 4, 4), 1, [3, 3, 3]),
    ],
)
def test_ms_ssim_settings_run_in_monai(shape, scales, kernel):
    settings = ms_ssim_settings(shape)
    assert settings["scales"] == scales and settings["kernel_size"] == kernel
    assert sum(settings["weights"]) == pytest.approx(1.0, abs=1e-3)
    volumes = torch.rand(3, 1, *shape, generator=torch.Generator().manual_seed(0))
    result = mean_pairwise_ms_ssim(volumes, settings, 0, "test", False)
    assert result["pairs"] == 3 and 0 <= result["mean"] < 1


def test_ms_ssim_copies_are_one_and_real_pairs_lie_between_copies_and_noise(world):
    settings = ms_ssim_settings((32, 32, 8))
    mean = {
        name: mean_pairwise_ms_ssim(world["loaded"][name][0], settings, 0, name, False)["mean"]
        for name in ("copies", "real", "noise")
    }
    assert mean["copies"] == pytest.approx(1.0, abs=1e-5)
    assert mean["noise"] + 0.3 < mean["real"] < mean["copies"] - 0.1, mean


# ------------------------------------------------------------------- controllability, utility


def test_evaluate_cohort_controllability_follows_the_attributes(world):
    report = evaluate_cohort(
        world["sets"]["real"], world["cohorts"]["same"], world["checkpoint"], 0, False, 0
    )
    shuffled = evaluate_cohort(
        world["sets"]["real"], world["cohorts"]["shuffled"], world["checkpoint"], 0, False, 0
    )
    assert set(report) == {
        "real",
        "synthetic",
        "checkpoint",
        "seed",
        "feature_net",
        "fidelity",
        "diversity",
        "controllability",
        "utility",
        "notes",
    }
    lv, lv_shuffled = report["controllability"]["lv"], shuffled["controllability"]["lv"]
    assert lv["n"] == 16 and lv["pearson_r"] > 0.8, lv
    assert lv_shuffled["pearson_r"] < 0.5 and lv_shuffled["mae_ml"] > 2 * lv["mae_ml"]
    assert report["controllability"]["rv"]["pearson_r"] > 0.6
    # the permutation really moved rows (else "shuffled" would measure the same)
    assert (world["order"] != np.arange(16)).sum() >= 12
    # the volumes are the same: fidelity and diversity do not depend on the attributes
    assert shuffled["fidelity"] == report["fidelity"]
    assert shuffled["diversity"] == report["diversity"]
    assert report["real"]["volumes"] == report["synthetic"]["volumes"] == 16
    json.dumps(report, allow_nan=False)


def test_the_real_halves_yardstick_is_below_a_shifted_scanner(world):
    """Two subject halves of the real set: a distance of the same distribution at that
    size, which the report prints beside the cohort's; a shifted scanner is farther."""
    real, shifted = world["sets"]["real"], world["cohorts"]["shifted"]
    report = evaluate_cohort(real, shifted, world["checkpoint"], 0, False, 0)
    for space in ("3d", "2d"):
        part = report["fidelity"][space]
        halves = part["real_halves"]
        assert halves["n_real"] + halves["n_synthetic"] == part["n_real"]
        assert halves["frechet_distance"] < part["frechet_distance"]
        assert halves["mmd2"] < part["mmd2"]


def test_split_keeps_each_subject_on_one_side(world):
    manifest = check_site(world["sets"]["real"], load_config("tiny").data, show_progress=False)
    test, train = split_subjects(manifest, seed=0)
    subjects = [r.subject for r in manifest.records]
    assert len(test) == len(train) == 8
    assert not {subjects[i] for i in test} & {subjects[i] for i in train}
    assert split_subjects(manifest, seed=0) == (test, train)
    assert split_subjects(manifest, seed=1) != (test, train)


def test_utility_regressor_learns_from_true_labels_not_from_shuffled_ones(world):
    train_volumes, train_rows, _ = world["loaded"]["train"]
    test_volumes, test_rows, _ = world["loaded"]["real"]
    train_ml, test_ml = lv_cavity_ml(train_rows), lv_cavity_ml(test_rows)
    shuffled_ml = train_ml[np.random.default_rng(0).permutation(len(train_ml))]
    # the shuffle moved the labels and broke their link with the volumes
    assert np.abs(shuffled_ml - train_ml).mean() > 20
    assert abs(np.corrcoef(shuffled_ml, train_ml)[0, 1]) < 0.3
    args = (test_volumes, test_ml, UTILITY_TEST_STEPS, 0, "utility", False)
    true = train_and_test(train_volumes, train_ml, *args)
    shuffled = train_and_test(train_volumes, shuffled_ml, *args)
    assert true["n_train"] == true["n_test"] == 16
    # MAE, not r, tells them apart: a barely trained net's output already follows the
    # cavity size (the bright blood pool), shuffled labels or not (r 0.82 here)
    assert true["mae_ml"] < 0.75 * shuffled["mae_ml"], (true, shuffled)
    assert true["pearson_r"] > 0.8, true


# ------------------------------------------------------------------------------------- CLI


def test_cli_reads_the_checkpoint_from_sampling_json(world, tmp_path, capsys):
    release = tmp_path / "release"
    cohort = release / "cohort"
    write_cohort(cohort, *world["loaded"]["same"])
    (release / "sampling.json").write_text(json.dumps({"checkpoint": str(world["checkpoint"])}))
    args = [
        "evaluate",
        "--real",
        str(world["sets"]["real"]),
        "--synthetic",
        str(cohort),
        "--quiet",
        "--utility-steps",
        "2",
        "--json",
    ]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["checkpoint"] == str(world["checkpoint"])
    assert set(report["fidelity"]["3d"]) >= {"frechet_distance", "mmd2", "n_real", "n_synthetic"}
    assert report["diversity"]["ms_ssim_settings"]["kernel_size"] == [7, 7, 1]
    assert report["utility"]["steps"] == 2
    assert set(report["utility"]["tstr"]) == {"mae_ml", "pearson_r", "n_train", "n_test"}
    text = table(report)
    for label in (
        "fidelity 3D",
        "fidelity 2D slices",
        "diversity MS-SSIM",
        "control LV cavity",
        "utility TSTR",
        "utility TRTR",
        "note: features come",
    ):
        assert label in text


def test_cli_help_states_the_utility_default():
    result = subprocess.run(
        [sys.executable, "-m", "fedsynth.common.cli", "evaluate", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert f"default: {UTILITY_STEPS}" in " ".join(result.stdout.split())


def test_cli_refusals_are_one_line(world, tmp_path, capsys):
    real, same = str(world["sets"]["real"]), str(world["cohorts"]["same"])
    checkpoint = str(world["checkpoint"])

    def refused(*args: str, expect: tuple[str, ...]) -> None:
        assert main(["evaluate", *args, "--quiet"]) == 1
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fedsynth evaluate: error: "), lines
        for fragment in expect:
            assert fragment in lines[0], lines[0]
        assert captured.out == ""

    refused("--real", real, "--synthetic", same, expect=("sampling.json", "--checkpoint"))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / CONFIG).write_text((world["checkpoint"] / CONFIG).read_text())
    refused(
        "--real",
        real,
        "--synthetic",
        same,
        "--checkpoint",
        str(bare),
        expect=(FEATURE_NET, "fedsynth pretrain"),
    )
    refused(
        "--real",
        str(tmp_path / "nowhere"),
        "--synthetic",
        same,
        "--checkpoint",
        checkpoint,
        expect=("--real", "nowhere: is not a folder"),
    )
    refused(
        "--real",
        real,
        "--synthetic",
        real,
        "--checkpoint",
        checkpoint,
        expect=("96x96x13", "32x32x8", "pass the checkpoint that generated"),
    )
    single = write_cohort(tmp_path / "single", *(x[:1] for x in world["loaded"]["same"]))
    refused(
        "--real",
        real,
        "--synthetic",
        str(single),
        "--checkpoint",
        checkpoint,
        expect=("1 usable volume", "at least 2"),
    )
    refused(
        "--real",
        real,
        "--synthetic",
        same,
        "--checkpoint",
        checkpoint,
        "--utility-steps",
        "-1",
        expect=("--utility-steps must be >= 0",),
    )
