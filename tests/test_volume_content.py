"""Content checks: a valid NIfTI file that is no MR magnitude image is refused or warned
about per row, naming the reason; `--strict` turns warnings into rejections."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from sitefiles import blob_volume, save_nifti, write_site

from fedsynth.common.data import check_site, load_volume
from fedsynth.common.volume_content import check_content


def label_map(shape=(24, 20, 6)) -> np.ndarray:
    """An ACDC-like `_gt` volume: 0 background, 1 RV, 2 myocardium, 3 LV cavity."""
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    radius = np.hypot(grid[0], grid[1])
    labels = np.zeros(shape, np.uint8)
    labels[radius < 0.6] = 2
    labels[radius < 0.4] = 3
    labels[(np.hypot(grid[0] + 0.6, grid[1]) < 0.3) & (labels == 0)] = 1
    return labels


def content_site(root):
    """One row per kind of content; returns {image: ("rejected" | "warning", reason)}."""
    save_nifti(root / "good.nii.gz", blob_volume())
    save_nifti(root / "frame01_gt.nii.gz", label_map())
    save_nifti(root / "mask.nii.gz", (blob_volume() > 0.5).astype(np.float32))
    stray = np.zeros((24, 20, 6), np.float32)
    stray[5, 5, 3] = 700.0
    save_nifti(root / "one_voxel.nii.gz", stray)
    huge = blob_volume(seed=2).astype(np.float64)
    huge[3, 4, 2] = 1e300
    save_nifti(root / "float64_1e300.nii.gz", huge)
    spikes = blob_volume(seed=3)
    spikes[[2, 10, 20], [3, 9, 15], [1, 3, 5]] = 1e30
    save_nifti(root / "spikes.nii.gz", spikes)
    phase = np.random.default_rng(4).uniform(-np.pi, np.pi, (24, 20, 6)).astype(np.float32)
    save_nifti(root / "phase.nii.gz", phase)
    wrapped = (blob_volume(seed=5) * 50000).astype(np.int32).astype(np.int16)  # overflowed
    save_nifti(root / "wrapped.nii.gz", wrapped)
    expected = {
        "good.nii.gz": None,
        "frame01_gt.nii.gz": (
            "rejected",
            "looks like a label map, not an image: only 4 distinct integer values (0, 1, 2, 3)",
        ),
        "mask.nii.gz": (
            "rejected",
            "looks like a label map, not an image: only 2 distinct integer values (0, 1)",
        ),
        "one_voxel.nii.gz": (
            "rejected",
            "nearly blank: 1 of 2880 voxels differ from the background 0",
        ),
        "float64_1e300.nii.gz": ("rejected", "values up to 1e+300 do not fit in 32-bit floats"),
        "spikes.nii.gz": (
            "warning",
            "3 voxels lie far outside the intensity range (up to 1e+30; 99.5th percentile",
        ),
        "phase.nii.gz": ("warning", "% of voxels are negative, which a magnitude image"),
        "wrapped.nii.gz": ("warning", "of voxels are negative, which a magnitude image"),
    }
    write_site(root, [{"image": name, "subject": f"s{i}"} for i, name in enumerate(expected)])
    return expected


def reasons(entries):
    return {e["file"]: e["reason"] for e in entries}


def site_check(site, *flags):
    command = ["fedsynth.common.cli", "site-check", "--config", "tiny", "--json", *flags]
    proc = subprocess.run(
        [sys.executable, "-m", *command, "--data-path", str(site)], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout)


def test_each_kind_of_content_is_refused_or_warned_per_row_and_strict_refuses_warnings(tmp_path):
    site = tmp_path / "site"
    expected = content_site(site)
    report = site_check(site)
    for kind, key in (("rejected", "rejected"), ("warning", "warnings")):
        got = reasons(report[key])
        want = {name: reason for name, (k, reason) in _given(expected) if k == kind}
        assert set(got) == set(want), key
        for name, reason in want.items():
            assert reason in got[name], (name, got[name])
    assert {"row", "file", "reason"} == set(report["warnings"][0])
    assert report["usable"] == 4  # good, spikes, phase, wrapped
    strict = site_check(site, "--strict")
    assert strict["usable"] == 1 and strict["warnings"] == []
    assert set(reasons(strict["rejected"])) == {name for name, _ in _given(expected)}
    assert reasons(strict["rejected"])["phase.nii.gz"].endswith("(--strict)")


def _given(expected):
    return [(name, value) for name, value in expected.items() if value is not None]


def test_a_phantom_manifest_with_image_and_label_swapped_is_refused_row_by_row(
    tmp_path, tiny_config
):
    from fedsynth.simulations.phantoms import generate_cohorts

    generate_cohorts(tmp_path, sites=1, subjects=1, seed=2, public_subjects=1, progress=False)
    manifest = tmp_path / "public" / "manifest.csv"
    with manifest.open(newline="") as f:
        rows = list(csv.DictReader(f))
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "image": r["label"], "label": r["image"]} for r in rows)
    result = check_site(tmp_path / "public", tiny_config.data, show_progress=False)
    assert result.records == [] and len(result.rejected) == len(rows) == 2
    assert all(r.reason.startswith("looks like a label map") for r in result.rejected)


def test_a_few_voxels_at_1e30_do_not_blank_the_volume(tmp_path, tiny_config):
    """Outliers are clipped before the resize would smear the spikes over their neighbours."""
    clean = blob_volume((48, 40, 12), seed=6)
    spiked = clean.copy()
    spiked[[4, 20, 40], [5, 18, 30], [2, 6, 10]] = 1e30
    volumes = [
        load_volume(save_nifti(tmp_path / f"{name}.nii.gz", data), tiny_config.data)
        for name, data in (("clean", clean), ("spiked", spiked))
    ]
    assert float(volumes[1].std()) > 0.2
    assert float(torch.mean(torch.abs(volumes[0] - volumes[1]))) < 0.02


def heart_labels(shape=(24, 20, 6)) -> np.ndarray:
    """A 24x20x6 ACDC-numbered label map: LV cavity in its myocardium, RV beside it."""
    labels = np.zeros(shape, np.float32)
    labels[6:18, 5:15, 1:5] = 2
    labels[9:15, 8:12, 1:5] = 3
    labels[6:18, 15:19, 1:5] = 1
    return labels


@pytest.mark.parametrize("scale", [1 / 3, 0.5, 0.1])
def test_a_label_map_with_non_integer_values_is_refused_as_a_label_map(
    tmp_path, tiny_config, scale
):
    """Labels 0-3 divided by 3 (a tool normalising to [0, 1]) or a 0/0.5 mask: a few values
    in constant regions are a label map whatever their scale, as the integer one is."""
    site = tmp_path / "site"
    save_nifti(site / "integer.nii.gz", heart_labels())
    save_nifti(site / "scaled.nii.gz", heart_labels() * np.float32(scale))
    rows = [{"image": "integer.nii.gz", "subject": "a"}, {"image": "scaled.nii.gz", "subject": "b"}]
    write_site(site, rows)
    result = check_site(site, tiny_config.data, show_progress=False)
    reasons = {r.row: r.reason for r in result.rejected}
    assert "label map" in reasons.get(1, ""), reasons
    assert "label map" in reasons.get(2, ""), "the same label map, scaled, is accepted"


def segmentation(classes: int = 40, shape=(24, 20, 6), seed: int = 0) -> np.ndarray:
    """Integer labels 0..classes in blocky regions (each class a 4x4x2 box of voxels)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int16)
    for value in range(1, classes + 1):
        x, y = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
        z = rng.integers(0, shape[2] - 1)
        labels[x : x + 4, y : y + 4, z : z + 2] = value
    return labels


def test_a_segmentation_with_more_classes_than_a_heart_label_map_is_refused(tmp_path, tiny_config):
    """TotalSegmentator-like: 40 integer classes (more than MAX_LABEL_VALUES) in one file."""
    site = tmp_path / "site"
    labels = segmentation()
    assert len(np.unique(labels)) > 17
    save_nifti(site / "totalseg.nii.gz", labels)
    write_site(site, [{"image": "totalseg.nii.gz", "subject": "a"}])
    result = check_site(site, tiny_config.data, show_progress=False)
    assert [r.reason.startswith("looks like a label map") for r in result.rejected] == [True]


def phantom_magnitude(seed: int) -> np.ndarray:
    """A phantom subject's ED image (float32, Rician noise; simulations/phantoms.py)."""
    from fedsynth.simulations.phantoms import make_subject, site_profiles

    profile = site_profiles(3, 0)[seed % 3]
    return make_subject(profile, np.random.default_rng(seed)).images[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_integer_mr_images_are_neither_label_maps_nor_phase(seed):
    """The other direction: a phantom scan stored as uint8 (0-255, even 0-50) or as a
    12-bit int16 scan has few values and large constant background, yet is an image with
    no warning: noise makes its neighbours differ and its background is dark."""
    image = phantom_magnitude(seed)
    for top in (4095.0, 255.0, 50.0):
        stored = np.round(image / image.max() * top).astype(np.float32)
        assert len(np.unique(stored)) <= 256 or top == 4095.0
        assert check_content(stored) == [], top


def siemens_phase(shape=(24, 20, 6), seed=0) -> np.ndarray:
    """A phase image as Siemens stores it (0-4095 for -pi..pi, dcm2niix's `_ph`): a smooth
    wrapped phase in the body, uniform noise outside."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = grid[0] ** 2 + grid[1] ** 2 < 0.8
    phase = 3.0 * np.exp(-(grid[0] ** 2 + grid[1] ** 2) * 2) + 5.0 * grid[0] + 2.0 * grid[2]
    phase = np.angle(np.exp(1j * phase))  # wrapped into -pi..pi
    phase = np.where(body, phase, rng.uniform(-np.pi, np.pi, shape))  # noise outside
    return np.round((phase + np.pi) / (2 * np.pi) * 4095).astype(np.uint16)


def test_an_unsigned_phase_image_is_warned_about_as_no_magnitude(tmp_path, tiny_config):
    """No negative voxels, but no dark background either: the row gets a phase warning."""
    site = tmp_path / "site"
    save_nifti(site / "sax_ph.nii.gz", siemens_phase())
    save_nifti(site / "sax.nii.gz", (blob_volume(seed=1) * 1000).astype(np.uint16))
    rows = [{"image": "sax_ph.nii.gz", "subject": "a"}, {"image": "sax.nii.gz", "subject": "b"}]
    write_site(site, rows)
    result = check_site(site, tiny_config.data, show_progress=False)
    assert result.rejected == []
    assert [(w.row, "phase image" in w.reason) for w in result.warnings] == [(1, True)]
