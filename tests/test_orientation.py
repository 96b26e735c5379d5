"""The short-axis frame: any oblique stack, stored in any axis order, reaches the model alike."""

from __future__ import annotations

import itertools
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.orientations import apply_orientation, inv_ornt_aff
from sitefiles import GOOD_ATTRIBUTES, write_site

from fedsynth.common.anatomy import load_labelled
from fedsynth.common.data import check_site, load_volume, to_model
from fedsynth.common.orientation import (
    APEX,
    OrientationError,
    short_axis_affine,
    short_axis_frame,
    short_axis_ornt,
    slice_axis,
    to_short_axis,
)

SPACING = (5.0, 5.0, 9.0)  # a stack the size of a heart's scan (plausibility.py)
SHAPE = (20, 16, 6)
IDENTITY = np.array([[0, 1], [1, 1], [2, 1]], float)
P, L, INFERIOR = np.array([0.0, -1, 0]), np.array([-1.0, 0, 0]), np.array([0.0, 0, -1])


def anatomy(seed: int = 0) -> np.ndarray:
    """A volume already in the frame, with a marker in the basal, anterior, right corner."""
    data = np.random.default_rng(seed).random(SHAPE).astype(np.float32)
    data[1:6, 1:5, 0:2] += 3.0  # rows low, columns low, slices low
    return data


def axial_affine() -> np.ndarray:
    """An axial stack in the frame's layout: rows posterior, columns left, slices inferior."""
    affine = np.eye(4)
    affine[:3, :3] = np.stack([P, L, INFERIOR], axis=1) * SPACING
    return affine


def about_ap(degrees: float) -> np.ndarray:
    """Rotation about the A-P axis taking inferior towards the patient's left."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    rotation = np.eye(4)
    rotation[:3, :3] = [[c, 0, s], [0, 1, 0], [-s, 0, c]]
    return rotation


def stored(data: np.ndarray, affine: np.ndarray, ornt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same anatomy with its voxel axes permuted/flipped as `ornt` says (exact)."""
    return apply_orientation(data, ornt), affine @ inv_ornt_aff(ornt, data.shape)


def every_storage() -> list[np.ndarray]:
    """All 48 axis orders and signs: RAS, LPS, slices first or last, either slice order."""
    return [
        np.array([[perm[i], flips[i]] for i in range(3)], float)
        for perm in itertools.permutations(range(3))
        for flips in itertools.product((1, -1), repeat=3)
    ]


def save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), path)
    return path


def model_input(data: np.ndarray, affine: np.ndarray, data_cfg) -> torch.Tensor:
    """What the model should see: the in-frame array with its in-frame affine, resampled
    onto the model grid and scaled, no reorientation."""
    return to_model(data, affine, data_cfg)[0]


@pytest.mark.parametrize("degrees", [0, 30, 60, 80])
def test_oblique_stack_keeps_slices_last_and_matches_the_unrotated(tmp_path, tiny_config, degrees):
    """Tilting the plane from head-foot towards left-right (60 and 80 degrees: the slice
    normal is closer to left-right) changes nothing for the same voxel array."""
    data = anatomy()
    affine = about_ap(degrees) @ axial_affine()
    normal = affine[:3, 2] / np.linalg.norm(affine[:3, 2])
    assert (abs(normal[0]) > abs(normal[2])) == (degrees > 45)  # the case named is drawn
    volume = load_volume(save(tmp_path / "v.nii.gz", data, affine), tiny_config.data)
    assert volume.shape == (1, *tiny_config.data.shape)
    expected = model_input(data, affine, tiny_config.data)
    torch.testing.assert_close(volume, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "affine",
    [axial_affine(), about_ap(70) @ axial_affine(), short_axis_affine(SPACING, SHAPE)],
    ids=["axial", "oblique-70", "nominal-sax"],
)
def test_any_storage_order_gives_the_same_array(affine):
    """The frame depends on the world geometry only, not on how voxels were stored."""
    data = anatomy()
    storages = every_storage()
    assert len(storages) == 48
    for ornt in storages:
        out, out_affine = to_short_axis(*stored(data, affine, ornt))
        assert np.array_equal(out, data), ornt.tolist()
        np.testing.assert_allclose(out_affine, affine, atol=1e-9)


@pytest.mark.parametrize(
    ("name", "ornt"),
    [
        ("RAS-like, slices last", [[0, 1], [1, 1], [2, 1]]),
        ("LPS (rows and columns flipped)", [[0, -1], [1, -1], [2, 1]]),
        ("apex to base", [[0, 1], [1, 1], [2, -1]]),
        ("slices first, transposed, apex to base", [[2, 1], [1, -1], [0, -1]]),
    ],
)
def test_files_stored_any_way_read_alike(tmp_path, tiny_config, name, ornt):
    """Through NIfTI files and the reader: the storage variants a scanner writes."""
    data = anatomy()
    affine = about_ap(60) @ axial_affine()
    path = save(tmp_path / "v.nii", *stored(data, affine, np.array(ornt, float)))
    volume = load_volume(path, tiny_config.data)
    expected = model_input(data, affine, tiny_config.data)
    torch.testing.assert_close(volume, expected, atol=1e-6, rtol=0)


def test_slices_run_from_base_to_apex(tmp_path, tiny_config):
    """A stack stored apex first (its slice direction pointing towards the base) is turned
    round: the stored first slice becomes the last, and the frame's w points to the apex."""
    data = anatomy()
    affine = short_axis_affine(SPACING, SHAPE)
    affine[:3, 2] *= -1  # stored slice 0 is now the apical end
    out, out_affine = to_short_axis(data, affine)
    assert np.array_equal(out, data[:, :, ::-1])
    assert out_affine[:3, 2] @ APEX > 0.99 * SPACING[2]
    assert np.all(out_affine[:3, 2] * [-1, 1, -1] > 0)  # left, anterior, inferior


def test_in_plane_normalisation():
    """Rows run posterior, columns to the patient's left for an axial stack; an in-plane
    rotation of less than 45 degrees keeps the layout."""
    u, v, w = short_axis_frame(INFERIOR).T
    assert u @ P > 0.85 and v @ L > 0.85 and np.allclose(np.cross(u, v), w)
    for degrees in (-30, -10, 10, 30):
        c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
        affine = short_axis_affine(SPACING, SHAPE)
        turn = np.array([[c, -s], [s, c]])
        affine[:3, :2] = affine[:3, :2] @ turn  # rotate rows/columns about the normal
        assert np.array_equal(short_axis_ornt(affine, SHAPE), IDENTITY), degrees


def test_slice_axis_rule():
    assert slice_axis(np.diag([8.0, 2, 2, 1]), (6, 20, 20)) == 0  # largest spacing
    assert slice_axis(np.diag([2.0, 2, 8, 1]), (6, 20, 40)) == 2  # spacing beats voxel count
    assert slice_axis(np.diag([1.0, 1, 1.05, 1]), (10, 40, 40)) == 0  # ~isotropic: fewest
    assert slice_axis(np.diag([1.0, 1, 1, 1]), (10, 10, 10)) == 2  # cube: the last axis


def test_affines_without_a_short_axis_frame_are_refused(tmp_path, tiny_config):
    singular = np.diag([2.0, 0, 9, 1])
    with pytest.raises(OrientationError, match="singular"):
        to_short_axis(anatomy(), singular)
    flat = axial_affine()
    flat[:3, :3] = flat[:3, :3] @ np.diag([1.0, 1, 0]) + np.outer(flat[:3, 0], [0, 0, 1])
    with pytest.raises(OrientationError, match="singular"):
        to_short_axis(anatomy(), flat)
    # slice normal right-anterior, perpendicular to the long axis: no base or apex end
    sideways = np.eye(4)
    normal = np.array([1.0, 1, 0]) / np.sqrt(2)
    sideways[:3, :3] = np.stack([[0, 0, 1.0], np.cross(normal, [0, 0, 1.0]), normal], 1) * SPACING
    site = tmp_path / "site"
    save(site / "a.nii.gz", anatomy(), sideways)
    save(site / "b.nii.gz", anatomy(1), axial_affine())
    write_site(
        site, [{"image": "a.nii.gz", "subject": "s1"}, {"image": "b.nii.gz", "subject": "s2"}]
    )
    result = check_site(site, tiny_config.data, show_progress=False)
    assert [r.row for r in result.records] == [2]
    (rejection,) = result.rejected
    assert "cannot tell the base from the apex" in rejection.reason
    assert "\n" not in rejection.reason


def test_labels_follow_their_volumes(tmp_path, tiny_config):
    """Label maps go through the same frame as their images (anatomy meter training)."""
    labels = np.zeros(SHAPE, np.float32)
    labels[2:9, 3:7, 1:4] = 3  # an LV blood pool
    image = labels / 3 + 0.1 * np.random.default_rng(0).random(SHAPE).astype(np.float32)
    affine = about_ap(75) @ axial_affine()
    site, rows = tmp_path / "site", []
    for i, ornt in enumerate(([[0, 1], [1, 1], [2, 1]], [[2, -1], [0, -1], [1, 1]])):
        ornt = np.array(ornt, float)
        # the second at twice the intensity (scaled away per volume): the same voxels in
        # another storage order would be one scan, its row refused as a duplicate
        save(site / f"i{i}.nii.gz", *stored(image * (1 + i), affine, ornt))
        save(site / f"l{i}.nii.gz", *stored(labels, affine, ornt))
        rows.append({"image": f"i{i}.nii.gz", "label": f"l{i}.nii.gz", "subject": f"s{i}"})
    write_site(site, rows, columns=["image", "label", "subject", *GOOD_ATTRIBUTES])
    manifest = check_site(site, tiny_config.data, show_progress=False)
    volumes, maps, _ = load_labelled(manifest, tiny_config.data, show_progress=False)
    assert torch.equal(maps[0], maps[1]) and maps[0].sum() > 0
    torch.testing.assert_close(volumes[0], volumes[1], atol=1e-6, rtol=0)
    for volume, label in zip(volumes, maps, strict=True):
        assert volume[label == 3].mean() > volume[label == 0].mean() + 0.5  # aligned
