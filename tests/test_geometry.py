"""Physical geometry: one analytic heart, stored at any pixel size, matrix and slice
thickness, reaches the model grid at its true size and shape; implausible stacks are
refused or warned about per row."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from sitefiles import GOOD_ATTRIBUTES, blob_volume, save_nifti, write_site

from fedsynth.common.anatomy import load_labelled
from fedsynth.common.config import DataConfig, load_config
from fedsynth.common.data import check_site, load_volume, place_labels
from fedsynth.common.orientation import short_axis_affine, to_short_axis
from fedsynth.common.sampling import _nifti

# the LV long axis, tilted from orientation.APEX: every stack is oblique
NORMAL = np.array([-0.45, 0.75, -0.48])
CAVITY = (25.0, 25.0, 40.0)  # LV cavity semi-axes (rows, columns, slices), mm
WALL = 8.0  # myocardium around it, mm
TRUE_ML = 4 / 3 * math.pi * CAVITY[0] * CAVITY[1] * CAVITY[2] / 1000  # 104.7 mL
BLOOD, MYO, TISSUE, VESSEL = 1.0, 0.3, 0.1, 0.8  # air is 0
AORTA = (40.0, 45.0, 10.0, 72.0)  # rows, columns (mm from the stack's axis), radius, length
BODY_MM = 90.0  # radius of the body, a cylinder along the slices (air in the corners)
# variants of the same heart: in-plane spacing (mm), matrix, slice thickness (mm)
VARIANTS = [
    (1.25, (256, 256), 8.0),
    (2.0, (256, 256), 8.0),
    (1.25, (208, 256), 10.0),
    (2.0, (96, 96), 6.0),
    (1.25, (256, 208), 6.0),
    (2.0, (96, 96), 10.0),
]


def fine_grid() -> DataConfig:
    """The default config's field of view (192 x 192 x 128 mm) at 2 x 2 x 4 mm voxels: fine
    enough to count a cavity's mL to a few percent."""
    data = load_config("tiny").data
    fov = np.asarray(data.shape) * np.asarray(data.spacing)
    spacing = (2.0, 2.0, 4.0)
    return replace(data, shape=tuple(int(n) for n in fov / spacing), spacing=spacing)


def faint_noise(image: np.ndarray) -> np.ndarray:
    """`image` plus uniform noise of 1e-4 of blood, as an MR image has some: a noise-free
    image of a few values in constant regions is refused as a label map."""
    rng = np.random.default_rng(0)
    return image + np.float32(1e-4 * BLOOD) * rng.random(image.shape, np.float32)


def heart(
    pixel: float,
    matrix: tuple[int, int],
    thickness: float,
    *,
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0),
    stack_mm: float = 120.0,
    cavity: tuple[float, float, float] = CAVITY,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, labels, affine): an ellipsoidal LV cavity (label 3) in a myocardial shell
    (label 2) centred `offset` mm from the stack's centre, in a body of tissue, in an
    oblique short-axis stack of `stack_mm` along the slices. Labels are taken at the voxel
    centres; the image is drawn from them, with faint noise (`faint_noise`)."""
    slices = math.ceil(stack_mm / thickness)
    shape = (*matrix, slices)
    spacing = (pixel, pixel, thickness)
    centres = [
        (np.arange(n) - (n - 1) / 2) * s - o for n, s, o in zip(shape, spacing, offset, strict=True)
    ]
    y, x, z = np.meshgrid(*centres, indexing="ij", sparse=True)

    def inside(axes: tuple[float, ...]) -> np.ndarray:
        return (y / axes[0]) ** 2 + (x / axes[1]) ** 2 + (z / axes[2]) ** 2 <= 1

    labels = np.zeros(shape, np.uint8)
    labels[inside(tuple(a + WALL for a in cavity))] = 2
    labels[inside(cavity)] = 3
    image = np.array([0.0, 0.0, MYO, BLOOD], np.float32)[labels]
    body = (y + offset[0]) ** 2 + (x + offset[1]) ** 2 <= BODY_MM**2
    image[(labels == 0) & body] = TISSUE
    return faint_noise(image), labels, short_axis_affine(spacing, shape, NORMAL)


def save(path: Path, data: np.ndarray, affine: np.ndarray | None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


Row = tuple[str, np.ndarray, np.ndarray | None, np.ndarray | None]  # as `heart` returns


def write_heart_site(root: Path, rows: list[Row]) -> Path:
    """A site of (name, image, labels or None, affine) rows, one subject each; each image
    scaled a little differently, so that no two rows hold the same voxel values."""
    manifest = []
    for i, (name, image, labels, affine) in enumerate(rows):
        row = {"image": f"{name}.nii.gz", "subject": name, "label": ""}
        save(root / row["image"], image * np.float32(1 + 0.01 * i), affine)
        if labels is not None:
            row["label"] = f"{name}_gt.nii.gz"
            save(root / row["label"], labels, affine)
        manifest.append(row)
    return write_site(root, manifest, columns=["image", "label", "subject", *GOOD_ATTRIBUTES])


def lv_stack(
    pixel: float,
    matrix: tuple[int, int],
    thickness: float,
    *,
    base: float,
    length: float,
    radius: float = 25.0,
    stack_mm: float = 160.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, labels, affine) of a left ventricle shaped like one, in a stack `stack_mm`
    long whose first slice centre is at 0 mm: a half prolate ellipsoid cavity (label 3)
    below a flat valve plane at `base` mm, `length` mm to its apex (semi-axes `radius`,
    `radius`, `length`), myocardium (label 2) `WALL` mm around it below the base, a
    descending aorta (label 4: a tube AORTA from the first slice to 72 mm along the slices)
    that is the same in every phase, body tissue around, air outside. Labels at voxel
    centres."""
    slices = math.ceil(stack_mm / thickness)
    shape = (*matrix, slices)
    y, x, z = np.meshgrid(
        (np.arange(matrix[0]) - (matrix[0] - 1) / 2) * pixel,
        (np.arange(matrix[1]) - (matrix[1] - 1) / 2) * pixel,
        np.arange(slices) * thickness,
        indexing="ij",
        sparse=True,
    )
    depth = z - base  # below the base plane, towards the apex

    def half(axes: tuple[float, float, float]) -> np.ndarray:
        return (depth >= 0) & (
            (y / axes[0]) ** 2 + (x / axes[1]) ** 2 + (depth / axes[2]) ** 2 <= 1
        )

    labels = np.zeros(shape, np.uint8)
    labels[half((radius + WALL, radius + WALL, length + WALL))] = 2
    labels[half((radius, radius, length))] = 3
    row, column, vessel_r, vessel_len = AORTA
    vessel = ((y - row) ** 2 + (x - column) ** 2 <= vessel_r**2) & (z <= vessel_len)
    labels[vessel & (labels == 0)] = 4
    image = np.array([TISSUE, 0.0, MYO, BLOOD, VESSEL], np.float32)[labels]
    image[(y**2 + x**2 > BODY_MM**2) & (labels == 0)] = 0.0  # air around the body
    return faint_noise(image), labels, short_axis_affine((pixel, pixel, thickness), shape, NORMAL)


def write_phases_site(root: Path, rows: list[Row]) -> Path:
    """A site of (name, image, labels, affine) rows with label maps, one subject, phases
    ED, ES, ED, ...; each image scaled a little differently (no two rows hold the same
    voxel values)."""
    manifest = []
    for i, (name, image, labels, affine) in enumerate(rows):
        row = {"image": f"{name}.nii.gz", "label": f"{name}_gt.nii.gz", "subject": "s1"}
        save(root / row["image"], image * np.float32(1 + 0.01 * i), affine)
        save(root / row["label"], labels, affine)
        manifest.append({**row, "phase": i % 2})
    return write_site(root, manifest, columns=["image", "label", "subject", *GOOD_ATTRIBUTES])


def on_grid(root: Path, data_cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and label maps of a site on the model grid, as the anatomy meter reads them."""
    manifest = check_site(root, data_cfg, show_progress=False, keep_volumes=True)
    assert not manifest.rejected, manifest.rejected
    volumes = torch.stack([r.volume for r in manifest.records])
    loaded = load_labelled(manifest, data_cfg, False, volumes)
    assert loaded is not None
    return loaded[0][:, 0], loaded[1][:, 0]


def centroid(mask: torch.Tensor) -> np.ndarray:
    return np.argwhere(mask.numpy()).mean(axis=0)


def test_one_heart_at_any_spacing_and_matrix_has_its_true_size_and_shape(tmp_path):
    """The cavity measured on the grid (label voxels, and the thresholded image, x the grid's
    voxel volume) is within 4% of the truth for every variant, round in-plane, and image
    and label map land on the same voxels. (Resizing the whole field of view gave 0.55x
    and 0.48x the size and an aspect of 1.46.)"""
    data_cfg = fine_grid()
    rows = [(f"v{i}", *heart(*variant)) for i, variant in enumerate(VARIANTS)]
    images, labels = on_grid(write_heart_site(tmp_path / "site", rows), data_cfg)
    voxel_ml = math.prod(data_cfg.spacing) / 1000
    threshold = (MYO + BLOOD) / 2 / BLOOD  # scaled between air (0.5th percentile) and blood
    for variant, image, label in zip(VARIANTS, images, labels, strict=True):
        cavity = label == 3
        assert float(cavity.sum()) * voxel_ml == pytest.approx(TRUE_ML, rel=0.04), variant
        bright = image > threshold
        assert float(bright.sum()) * voxel_ml == pytest.approx(TRUE_ML, rel=0.04), variant
        points = np.argwhere(cavity.numpy())
        aspect = points[:, 0].std() / points[:, 1].std()
        assert aspect == pytest.approx(1.0, abs=0.03), variant
        # within half a voxel: where 8 mm slices meet this 4 mm grid, every other grid slice
        # lies half-way between two, the image there exactly at the threshold (not counted)
        # and the label map split between the two labels
        np.testing.assert_allclose(centroid(bright), centroid(cavity), atol=0.5)
        dice = 2 * float((bright & cavity).sum()) / float(bright.sum() + cavity.sum())
        assert dice > 0.9, variant


def test_the_heart_of_a_label_map_is_put_in_the_grid_centre(tmp_path):
    """An off-centre heart is centred in-plane on the grid where the row has a label map,
    its image with it; along the slices the grid starts at the stack's base, moved the
    least that holds the heart (here: to the stack's middle). Without a label map the grid
    starts at the base, centred on the image in-plane, and the heart stays where it was."""
    data_cfg = load_config("tiny").data
    offset = (40.0, -30.0, 16.0)
    image, labels, affine = heart(2.0, (160, 160), 8.0, offset=offset, stack_mm=160.0)
    site = write_heart_site(tmp_path / "site", [("h", image, labels, affine)])
    images, placed = on_grid(site, data_cfg)
    middle = (np.asarray(data_cfg.shape) - 1) / 2
    along = middle + np.array([0.0, 0.0, offset[2] / data_cfg.spacing[2]])
    np.testing.assert_allclose(centroid(placed[0] == 3), along, atol=0.5)
    np.testing.assert_allclose(centroid(images[0] > 0.6), along, atol=0.5)
    alone = load_volume(site / "h.nii.gz", data_cfg)[0]
    shift = np.asarray(offset) / np.asarray(data_cfg.spacing)
    from_base = (offset[2] + 160.0 / 2) / data_cfg.spacing[2] - 0.5  # the grid at the base
    expected = np.array([*(middle + shift)[:2], from_base])
    np.testing.assert_allclose(centroid(alone > 0.6), expected, atol=0.5)


def test_label_maps_are_resampled_without_blending_classes():
    """geometry.resample of a label map takes each voxel's majority label: only the labels
    that were there."""
    from fedsynth.common.geometry import model_grid, resample

    _, labels, affine = heart(2.0, (96, 96), 10.0)
    data_cfg = load_config("tiny").data
    grid = model_grid(affine, data_cfg.spacing, data_cfg.shape, np.zeros(3))
    placed = resample(labels.astype(np.float32), affine, grid, data_cfg.shape, labels=True)
    assert set(np.unique(placed.data).tolist()) == {0.0, 2.0, 3.0}


def test_a_released_volume_is_read_back_unchanged(tmp_path):
    """The release's NIfTI (sampling._nifti: config spacing, short-axis affine) is already on
    the model grid: the reader's resampling is the identity, only the scaling is applied."""
    from fedsynth.common.geometry import image_centre, model_grid, resample

    data_cfg = load_config("tiny").data
    volume = np.random.default_rng(0).random(data_cfg.shape).astype(np.float32)
    path = tmp_path / "s.nii.gz"
    nib.save(_nifti(volume, data_cfg.spacing), path)
    stored = nib.load(path)
    framed, affine = to_short_axis(np.asarray(stored.dataobj), stored.affine)
    np.testing.assert_array_equal(framed, volume)  # already in the frame
    grid = model_grid(affine, data_cfg.spacing, data_cfg.shape, image_centre(affine, volume.shape))
    np.testing.assert_allclose(grid, affine, atol=1e-4)  # the header holds float32
    placed = resample(volume, affine, grid, data_cfg.shape)
    np.testing.assert_array_equal(placed.data, volume)
    assert placed.inside.all()
    read = load_volume(path, data_cfg)[0].numpy()
    low, high = np.percentile(volume, data_cfg.intensity_percentiles)
    np.testing.assert_allclose(read, np.clip((volume - low) / (high - low), 0, 1), atol=1e-6)


def test_implausible_stacks_are_refused_or_warned_per_row(tmp_path):
    """Each case gets its reason in site-check's rejections or warnings (the old reader took
    every one of them silently, or with a note about codes only)."""
    image, labels, affine = heart(2.0, (96, 96), 10.0)
    gap = image.copy()
    gap[..., 5] = 0.0  # a missing slice, zero-filled
    blank_end = image.copy()
    blank_end[..., -1] = 0.0
    cut_image, cut_labels, cut_affine = heart(2.0, (96, 96), 10.0, offset=(0, 0, 45.0))
    base_image, base_labels, base_affine = heart(2.0, (96, 96), 10.0, offset=(0, 0, -45.0))
    long_image, long_labels, long_affine = heart(
        2.0, (96, 96), 10.0, stack_mm=200.0, cavity=(25.0, 25.0, 70.0)
    )
    tall_image, tall_labels, tall_affine = heart(2.0, (96, 96), 10.0, stack_mm=200.0)
    short_image, _, short_affine = heart(2.0, (96, 96), 8.0, stack_mm=48.0)
    thin = short_axis_affine((1.0, 1.0, 1.0), image.shape, NORMAL)  # 1 mm on 12 slices
    narrow_image, _, narrow_affine = heart(2.0, (24, 24), 10.0)
    rows = [
        ("good", image, labels, affine),
        ("no_geometry", image, None, None),
        ("thin_slices", image, None, thin),
        ("narrow", narrow_image, None, narrow_affine),
        ("gap", gap, None, affine),
        ("blank_end", blank_end, None, affine),
        ("cut", cut_image, cut_labels, cut_affine),
        ("base_cut", base_image, base_labels, base_affine),
        ("short", short_image, None, short_affine),
        ("long_heart", long_image, long_labels, long_affine),
        ("long_stack", tall_image, tall_labels, tall_affine),
        ("label_elsewhere", image, labels, affine),
    ]
    site = write_heart_site(tmp_path / "site", rows)
    moved = affine.copy()
    moved[:3, 3] += 300.0  # the label map 520 mm away from its image: no overlap
    save(site / "label_elsewhere_gt.nii.gz", labels, moved)
    result = check_site(site, load_config("tiny").data, show_progress=False)
    rejected = {r.file.removesuffix(".nii.gz"): r.reason for r in result.rejected}
    warned: dict[str, list[str]] = {}
    for w in result.warnings:
        warned.setdefault(w.file.removesuffix(".nii.gz"), []).append(w.reason)
    assert set(rejected) == {"no_geometry", "thin_slices", "narrow", "gap", "label_elsewhere"}
    assert "label map does not overlap its image in space" in rejected["label_elsewhere"]
    assert "no stored geometry" in rejected["no_geometry"]
    assert "covers only 12 mm along the slices" in rejected["thin_slices"]
    assert "in-plane field of view 48 x 48 mm" in rejected["narrow"]
    assert "slice(s) 6 of 12" in rejected["gap"] and "missing slices" in rejected["gap"]
    assert set(warned) == {"blank_end", "cut", "short", "long_heart"}, warned
    assert warned["blank_end"] == ["the last 1 slice(s) of 12 (base to apex) are blank"]
    assert any("last (apical) slice" in w and "before the apex" in w for w in warned["cut"])
    assert "base_cut" not in warned  # stacks are planned from the base: labels there are usual
    assert any("48 mm along the slices, much less" in w for w in warned["short"])
    assert any("beyond the model's field of view" in w for w in warned["long_heart"])
    reasons = [*rejected.values(), *(w for notes in warned.values() for w in notes)]
    assert all("\n" not in r for r in reasons)


def framed_heart(profile, seed: int, folder: int, index: int):
    """A phantom's ED label map in the short-axis frame and its affine."""
    from fedsynth.simulations.phantoms import make_subject, subject_rng

    subject = make_subject(profile, subject_rng(seed, folder, index))
    labels = subject.labels[0]
    affine = short_axis_affine(subject.spacing, labels.shape, np.asarray(subject.long_axis))
    return to_short_axis(labels, affine)


def test_phantom_hearts_fit_the_default_field_of_view():
    """The default grid is 128 mm along the slices: over 1,320 phantom volumes of every
    profile, 10 hearts reached past 112 mm (6 x 6 x 14 mm), none past 128 mm. A few of
    every profile, and one drawn case with ventricles 100 mm long, fit the default grid."""
    from fedsynth.common.data import stack_grid
    from fedsynth.common.plausibility import check_heart
    from fedsynth.simulations.phantoms import PUBLIC, site_profiles

    data = load_config("default").data
    profiles = [*site_profiles(10, seed=0), PUBLIC]
    cases = [(p, 0, k, i) for k, p in enumerate(profiles) for i in range(2)]
    cases.append((profiles[2], 123, 2, 37))  # site-3: ventricles 100 mm long, off-centre
    for profile, seed, folder, index in cases:
        labels, affine = framed_heart(profile, seed, folder, index)
        grid = stack_grid(affine, labels.shape, data, (labels, affine))
        on_grid = check_heart(labels, affine, affine, labels.shape, grid, data.shape)
        assert on_grid == [], (profile.name, index)
    short = replace(data, spacing=(6.0, 6.0, 10.0))  # 80 mm: shorter than its 94 mm heart
    grid = stack_grid(affine, labels.shape, short, (labels, affine))
    cut = check_heart(labels, affine, affine, labels.shape, grid, data.shape)
    assert "cropped" in cut[0]  # the case is hit


def test_zero_padding_does_not_enter_the_intensity_scaling():
    """A stack filling half the grid's length, from the grid's first (basal) slice: its own
    voxels are scaled between their percentiles (the darkest at 0, not lifted by counting
    the padding as the darkest), the padding is 0."""
    from fedsynth.common.data import to_model

    data_cfg = load_config("tiny").data
    rng = np.random.default_rng(0)
    slices = 4  # 4 x 16 mm: half the 128 mm the grid holds along the slices
    volume = (1000 + 500 * rng.random((32, 32, slices))).astype(np.float32)
    affine = short_axis_affine(data_cfg.spacing, volume.shape, NORMAL)
    placed = to_model(volume, affine, data_cfg)[0][0].numpy()
    inside = placed[..., :4]
    assert np.quantile(inside, 0.005) == pytest.approx(0.0, abs=1e-3)
    assert np.quantile(inside, 0.995) == pytest.approx(1.0, abs=1e-3)
    assert np.all(placed[..., 4:] == 0)


def test_ed_and_es_of_one_stack_land_on_the_same_grid(tmp_path):
    """The ED and ES frames of one cine are one stack: a static structure (the aorta) lies
    at the same grid position at ED and ES. (Each frame centred on its own heart's centroid
    shifted the ES frame about half a slice: the base descends in systole.)"""
    data_cfg = load_config("default").data
    # ED: base plane 15 mm below the first slice, cavity 80 mm long; ES: the base descends
    # 15 mm (a normal mitral annular excursion), apex fixed, cavity narrower
    ed = lv_stack(2.0, (96, 96), 10.0, base=15.0, length=80.0)
    es = lv_stack(2.0, (96, 96), 10.0, base=30.0, length=65.0, radius=19.0)
    np.testing.assert_array_equal(ed[2], es[2])  # one stack
    shift = np.argwhere(np.isin(es[1], (2, 3))).mean(0) - np.argwhere(np.isin(ed[1], (2, 3))).mean(
        0
    )
    assert np.linalg.norm(shift * (2.0, 2.0, 10.0)) > 6.0  # the case is hit: the hearts move
    site = write_phases_site(tmp_path / "site", [("ed", *ed), ("es", *es)])
    images, _ = on_grid(site, data_cfg)
    middle = (np.asarray(data_cfg.shape[:2]) - 1) / 2
    offset = np.asarray(AORTA[:2]) / np.asarray(data_cfg.spacing[:2])
    row, column = (middle + offset).round().astype(int)
    depths = []
    for volume in images.numpy():
        profile = volume[row - 1 : row + 2, column - 1 : column + 2].sum(axis=(0, 1))
        depths.append(float((np.arange(len(profile)) * profile).sum() / profile.sum()))
    assert abs(depths[1] - depths[0]) < 0.15, f"the aorta at grid slices {depths}"


def test_a_heart_shorter_than_the_grid_is_not_cropped(tmp_path):
    """A dilated LV 112 mm from valve plane to apex, the whole heart in a 160 mm stack: on
    the default grid (16 mm x 8 = 128 mm) every slice of it is kept and no row warns that
    it is cropped. (Centring on the heart's centroid, 3/8 of its length from the flat base,
    left basal grid slices empty and cut the apex.)"""
    data_cfg = load_config("default").data
    length = 104.0
    fov = data_cfg.shape[2] * data_cfg.spacing[2]
    assert length + WALL <= fov - data_cfg.spacing[2]  # half a grid slice to spare at each end
    stack = lv_stack(2.0, (96, 96), 10.0, base=20.0, length=length)
    site = write_phases_site(tmp_path / "site", [("long", *stack)])
    manifest = check_site(site, data_cfg, show_progress=False)
    cropped = [w.reason for w in manifest.warnings if "cropped" in w.reason]
    _, labels = on_grid(site, data_cfg)
    areas = np.isin(labels[0].numpy(), (2, 3)).sum(axis=(0, 1))
    assert not cropped, f"{cropped}; heart cross-sections on the grid slices {areas.tolist()}"
    assert areas[-1] < 0.5 * areas.max(), f"the apex is cut: {areas.tolist()}"


@pytest.mark.parametrize("pixel", [1.25, 2.0])
def test_a_label_map_half_a_voxel_off_the_grid_holds_the_cavity_volume(tmp_path, pixel):
    """On the large preset's grid (3 x 3 x 8 mm) the grid slices fall half-way between a
    stack's 8 mm slices: the LV cavity of the label map there is within 5% of the truth, as
    the image's is. (Nearest sampling broke the ties by float rounding, taking source slices
    twice or not at all: 119.8 mL and 116.9 mL for the true 104.7 mL.)"""
    data_cfg = load_config("large").data
    site = write_heart_site(tmp_path / "site", [("h", *heart(pixel, (256, 256), 8.0))])
    images, labels = on_grid(site, data_cfg)
    voxel_ml = math.prod(data_cfg.spacing) / 1000
    image_ml = float((images[0] > 0.65).sum()) * voxel_ml
    label_ml = float((labels[0] == 3).sum()) * voxel_ml
    assert image_ml == pytest.approx(TRUE_ML, rel=0.05)
    assert label_ml == pytest.approx(TRUE_ML, rel=0.05), f"label map {label_ml:.1f} mL"


def test_a_cropped_heart_is_reported_at_its_length(tmp_path):
    """The warning that a heart is cropped states its length along the slices as the label
    voxels span it (outer centres plus one 10 mm slice), not one 16 mm grid voxel more."""
    data_cfg = load_config("default").data
    stack = lv_stack(2.0, (96, 96), 10.0, base=5.0, length=145.0, stack_mm=200.0)
    slices = np.flatnonzero(np.isin(stack[1], (2, 3)).any(axis=(0, 1)))
    length = (slices[-1] - slices[0] + 1) * 10.0
    manifest = check_site(
        write_phases_site(tmp_path / "site", [("long", *stack)]), data_cfg, show_progress=False
    )
    cropped = [w.reason for w in manifest.warnings if "cropped" in w.reason]
    assert cropped == [
        f"the heart ({length:.0f} mm along the slices) reaches beyond the model's field of "
        "view: it is cropped"
    ], cropped


def test_a_label_map_half_a_slice_off_the_grid_keeps_its_volume():
    """geometry.resample of a label map onto grid slices half-way between its 8 mm slices
    (the affine rounded to float32, as a file stores it): the cavity keeps its volume to
    within 5% (ties split, not all given to one label; nearest sampling took source slices
    twice or not at all by float rounding, 119.8 mL for the true 104.7 mL)."""
    from fedsynth.common.geometry import image_centre, model_grid, resample

    _, labels, affine = heart(1.25, (256, 256), 8.0)
    stored = affine.astype(np.float32).astype(float)
    spacing, shape = (3.0, 3.0, 8.0), (64, 64, 16)
    centre = image_centre(stored, labels.shape)  # grid slices half-way between the stack's
    grid = model_grid(stored, spacing, shape, centre)
    placed = resample(labels.astype(np.float32), stored, grid, shape, labels=True)
    cavity_ml = float((placed.data == 3).sum()) * math.prod(spacing) / 1000
    assert cavity_ml == pytest.approx(TRUE_ML, rel=0.05)


def test_slices_that_divide_the_grid_spacing_land_on_grid_slices(tmp_path):
    """8 mm slices on the default 16 mm grid: the grid's first slice is centred on the
    stack's first, so grid slice k falls on source slice 2k and a label map keeps its
    classes whole. (A window starting at the stack's basal edge put every grid slice
    half-way between two source slices, where a label map ties: on the phantoms the LV's
    basal slice came out a checkerboard.)"""
    from fedsynth.common.data import stack_grid

    data_cfg = load_config("default").data
    _, labels, affine = heart(2.0, (96, 96), 8.0)
    grid = stack_grid(affine, labels.shape, data_cfg)
    to_source = np.linalg.inv(affine) @ grid
    slices = np.arange(data_cfg.shape[2])
    centres = (
        to_source[2, 2] * slices
        + to_source[2, 3]
        + to_source[2, :2] @ ((np.asarray(data_cfg.shape[:2]) - 1) / 2)
    )
    np.testing.assert_allclose(centres, 2 * slices, atol=1e-6)


def cylinder_stack(first: int, last: int, slices: int = 18, thickness: float = 8.0):
    """(labels, affine): a cylindrical LV (cavity radius 25 mm in an 8 mm wall, ACDC labels)
    on slices first..last of a stack of 8 mm slices, 1.5 mm pixels, in the short-axis frame."""
    pixel = 1.5
    shape = (160, 160, slices)
    affine = short_axis_affine((pixel, pixel, thickness), shape)
    y, x = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * pixel for n in shape[:2]], indexing="ij")
    radius = np.hypot(y, x)
    labels = np.zeros(shape, np.float32)
    labels[..., first : last + 1][radius <= 33.0] = 2
    labels[..., first : last + 1][radius <= 25.0] = 3
    return labels, affine


@pytest.mark.parametrize("first, last", [(5, 17), (3, 17), (1, 15), (0, 13)])
def test_a_window_the_heart_moves_keeps_grid_slices_on_source_slices(tiny_config, first, last):
    """8 mm slices onto the tiny 16 mm grid: where the heart reaches past the window that
    starts on the stack's first slice (slices 5-17, 3-17 of 18: a stack that starts above
    the base), or is longer than it (1-15), the window moves; it must still start on a
    source slice, so that every grid slice holds a whole cross-section or none (a start at
    the heart's edge put each grid slice half-way between two source slices, and the slice
    at the heart's basal end came out a checkerboard of cavity and background). 0-13 fits
    the window unmoved."""
    labels, affine = cylinder_stack(first, last)
    placed = place_labels((labels, affine), tiny_config.data)[0].numpy()
    neighbours = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]])
    for label in (2, 3):
        mask = (placed == label).astype(int)
        for k in range(mask.shape[2]):
            around = ndimage.convolve(mask[..., k], neighbours, mode="constant")
            isolated = int(np.count_nonzero(mask[..., k] & (around == 0)))
            assert isolated == 0, f"label {label}, grid slice {k}: {isolated} isolated voxels"
    cavity = (placed == 3).sum(axis=(0, 1))
    whole = cavity.max()
    assert set(cavity.tolist()) <= {0, whole}, cavity  # whole cross-sections or none


SHEAR_DEG = 25.0


def sheared_heart() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`heart`'s LV (drawn in world mm, so round in the scanner) in a stack of 8 mm slices,
    1.25 mm pixels, whose slice step leans SHEAR_DEG towards the rows' direction."""
    matrix, thickness = (208, 256), 8.0
    _, _, straight = heart(1.25, matrix, thickness)
    frame = straight[:3, :3] / np.linalg.norm(straight[:3, :3], axis=0)
    affine = straight.copy()
    affine[:3, 2] += math.tan(math.radians(SHEAR_DEG)) * thickness * frame[:, 0]
    shape = (*matrix, math.ceil(120.0 / thickness))
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    centre = affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    local = (index.reshape(-1, 3) @ affine[:3, :3].T - centre) @ frame

    def inside(axes) -> np.ndarray:
        return ((local / np.asarray(axes)) ** 2).sum(axis=1) <= 1

    labels = np.zeros(len(local), np.uint8)
    labels[inside([a + WALL for a in CAVITY])] = 2
    labels[inside(CAVITY)] = 3
    image = np.array([0.0, 0.0, MYO, BLOOD], np.float32)[labels]
    image[(labels == 0) & ((local[:, :2] ** 2).sum(axis=1) <= BODY_MM**2)] = TISSUE
    return faint_noise(image.reshape(shape)), labels.reshape(shape), affine


def test_a_sheared_stack_is_refused_with_its_angle(tmp_path):
    """A stack whose slices step 25 degrees off their planes' normal (per-slice series whose
    field of view moved, a gantry tilt) was placed on a grid sheared alike (the cavity at an
    in-plane aspect of 1.24, 109% of its volume): refused, naming the angle. A shear within
    float rounding (0.3 degrees) is accepted."""
    image, labels, affine = sheared_heart()
    slight = heart(1.25, (208, 256), 8.0)
    slight[2][:3, 2] += math.tan(math.radians(0.3)) * 8.0 * slight[2][:3, 0] / 1.25
    root = write_heart_site(
        tmp_path / "site", [("tilted", image, labels, affine), ("slight", *slight)]
    )
    manifest = check_site(root, fine_grid(), show_progress=False)
    assert [r.row for r in manifest.rejected] == [1], manifest.rejected
    assert "meet at 65.0 degrees" in manifest.rejected[0].reason, manifest.rejected[0].reason


def test_a_stack_larger_than_a_chest_is_refused(tmp_path, tiny_config):
    """A 256 x 256 x 10 stack with a spacing ten times too large (15.625 mm pixels, 80 mm
    slices: pixdim in 0.1 mm, or micrometres read as mm) spans 4 m in-plane and 80 cm along
    the slices and would place the heart at a tenth of its size: refused naming the sizes,
    as one ten times too small is; so are a 700 mm in-plane field of view and a 480 mm
    stack, while 500 mm in-plane and 320 mm along the slices pass the size check."""
    site = tmp_path / "site"
    scan = (blob_volume((256, 256, 10), seed=4) * 1000).astype(np.float32)
    sizes = {
        "tenfold": (15.625, 15.625, 80.0),
        "tenth": (0.15625, 0.15625, 0.8),
        "wide": (2.734375, 2.734375, 8.0),  # 700 mm
        "long": (1.5, 1.5, 48.0),  # 480 mm
        "large": (1.953125, 1.953125, 32.0),  # 500 mm, 320 mm
    }
    for name, zooms in sizes.items():
        save_nifti(site / f"{name}.nii.gz", scan, zooms=zooms)
    write_site(site, [{"image": f"{name}.nii.gz", "subject": name} for name in sizes])
    result = check_site(site, tiny_config.data, show_progress=False)
    reasons = {r.row: r.reason for r in result.rejected}
    assert sorted(reasons) == [1, 2, 3, 4], reasons
    assert "4000 x 4000 mm in-plane" in reasons[1] and "800 mm along the slices" in reasons[1]
    assert "spacing in the header right?" in reasons[1]
