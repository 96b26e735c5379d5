"""The anatomy meter: trained on public labelled phantoms, it measures held-out sites' cavities."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedsynth.common.anatomy import (
    VolumeMeter,
    agreement,
    load_labelled,
    train_volume_meter,
)
from fedsynth.common.config import load_config
from fedsynth.common.data import SiteDataset, check_site
from fedsynth.simulations.phantoms import generate_cohorts


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    generate_cohorts(out, sites=1, subjects=12, seed=1, public_subjects=16, progress=False)
    return out


def labelled(cohort: Path, folder: str):
    data = load_config("tiny").data
    return load_labelled(check_site(cohort / folder, data, show_progress=False), data, False)


def test_meter_measures_a_held_out_site(cohort):
    volumes, labels, requested = labelled(cohort, "public")
    assert labels.shape == (32, 1, 32, 32, 8) and labels.dtype == torch.long
    assert set(labels.unique().tolist()) == set(range(6))
    # ED rows state EDV, ES rows ESV
    assert np.all(requested["lv"][0::2] > requested["lv"][1::2])
    # 80 steps: along the slices each heart lies where its stack starts it (one grid for the
    # frames of a stack), which 40 steps learn less well than hearts all centred on the grid
    meter = train_volume_meter(volumes, labels, requested, steps=80, seed=0, show_progress=False)
    site_volumes, _, site_requested = labelled(cohort, "site-1")
    measured = meter.measure(site_volumes)
    lv = agreement(site_requested["lv"], measured["lv"])
    assert lv["n"] == 24 and lv["pearson_r"] > 0.85, lv
    assert agreement(site_requested["rv"], measured["rv"])["pearson_r"] > 0.7
    # a meter read back from its state measures the same
    again = VolumeMeter.from_state(meter.state()).measure(site_volumes)
    np.testing.assert_allclose(again["lv"], measured["lv"])


def test_agreement_numbers():
    requested = np.array([100.0, 150.0, 200.0])
    result = agreement(requested, requested + np.array([10.0, -10.0, 4.0]))
    assert result["mae_ml"] == pytest.approx(8.0)
    assert result["pearson_r"] == pytest.approx(np.corrcoef(requested, [110, 140, 204])[0, 1])


def test_volumes_already_loaded_are_used_as_read(cohort):
    data = load_config("tiny").data
    manifest = check_site(cohort / "public", data, show_progress=False)
    read, labels, requested = load_labelled(manifest, data, False)
    # what pretraining already holds: the dataset's volumes, in the manifest's order
    dataset = SiteDataset(manifest, data)
    held = torch.stack([dataset[i][0] for i in range(len(dataset))])
    given = load_labelled(manifest, data, False, volumes=held)
    assert torch.equal(given[0], read) and torch.equal(given[1], labels)
    assert np.array_equal(given[2]["lv"], requested["lv"])
    # and they are used, not read again
    assert torch.equal(load_labelled(manifest, data, False, volumes=held + 1)[0], read + 1)


def test_grid_voxels_hold_the_grid_voxel_volume(cohort):
    """Label maps on the model grid (resampled in mm): the LV cavity's voxel count times
    the grid's voxel volume is the stated mL to within 15% for the median subject, and the
    count-to-mL slope the meter's calibration fits comes out near that voxel volume."""
    data = load_config("tiny").data
    loaded = load_labelled(check_site(cohort / "public", data, show_progress=False), data, False)
    assert loaded is not None
    _, labels, requested = loaded
    voxel_ml = float(np.prod(data.spacing)) / 1000
    counts = (labels == 3).flatten(1).sum(1).numpy()
    assert np.median(counts * voxel_ml / requested["lv"]) == pytest.approx(1.0, abs=0.15)
    slope, _ = np.polyfit(counts, requested["lv"], 1)
    assert slope == pytest.approx(voxel_ml, rel=0.25)
