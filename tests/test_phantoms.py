"""Phantom cohorts: attributes drive the anatomy, files are well formed, sites differ."""

from __future__ import annotations

import argparse
import csv
import itertools
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedsynth.common.errors import FedsynthError
from fedsynth.common.orientation import short_axis_ornt
from fedsynth.simulations import phantoms, phantoms_cmd
from fedsynth.simulations.phantoms import generate_cohorts

COLUMNS = [
    "image",
    "label",
    "subject",
    "lvedv",
    "lvesv",
    "lvef",
    "rvedv",
    "rvesv",
    "rvef",
    "lv_mass",
    "wall_ed",
    "wall_es",
    "age",
    "sex",
    "bmi",
    "phase",
]
RANGES = {
    "lvedv": (40, 400),
    "lvesv": (10, 350),
    "lvef": (10, 85),
    "rvedv": (40, 400),
    "rvesv": (10, 350),
    "rvef": (10, 85),
    "lv_mass": (30, 300),
    "wall_ed": (3, 20),
    "wall_es": (4, 30),
    "age": (18, 95),
    "sex": (0, 1),
    "bmi": (14, 50),
    "phase": (0, 1),
}
SUBJECT_LEVEL = [c for c in COLUMNS[2:] if c != "phase"]
FOLDERS = ["public", "site-1", "site-2", "site-3"]
IDENTITY = np.array([[0, 1], [1, 1], [2, 1]], float)  # nibabel orientation: no change


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    generate_cohorts(out, sites=3, subjects=2, seed=3, public_subjects=2, progress=False)
    return out


def read_manifest(folder: Path) -> list[dict[str, str]]:
    with open(folder / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def all_rows(cohort: Path) -> list[tuple[Path, dict[str, str]]]:
    return [(cohort / name, row) for name in FOLDERS for row in read_manifest(cohort / name)]


def load(path: Path) -> tuple[np.ndarray, nib.Nifti1Image]:
    image = nib.load(path)
    return np.asarray(image.dataobj), image


def test_layout_and_manifest_columns(cohort: Path) -> None:
    assert sorted(p.name for p in cohort.iterdir() if p.is_dir()) == FOLDERS
    assert (cohort / "montage.png").stat().st_size > 10_000
    subjects: dict[str, list[int]] = {}
    for name in FOLDERS:
        with open(cohort / name / "manifest.csv", newline="") as f:
            assert next(csv.reader(f)) == COLUMNS
        rows = read_manifest(cohort / name)
        assert len(rows) == 2 * 2
        for row in rows:
            for key in ("image", "label"):
                assert not Path(row[key]).is_absolute() and row[key].endswith(".nii.gz")
                assert (cohort / name / row[key]).is_file()
            assert row["image"].startswith("images/") and row["label"].startswith("labels/")
            assert row["subject"].startswith(f"{name}-sub-")
            subjects.setdefault(row["subject"], []).append(int(row["phase"]))
    assert len(subjects) == 4 * 2  # unique across folders
    assert all(sorted(phases) == [0, 1] for phases in subjects.values())
    assert not list(cohort.rglob("*.tmp*"))  # atomic writes leave no temporaries


def test_label_volumes_match_attributes(cohort: Path) -> None:
    for folder, row in all_rows(cohort):
        labels, image = load(folder / row["label"])
        voxel_ml = float(np.prod(image.header.get_zooms())) / 1000
        es = row["phase"] == "1"
        lv = np.count_nonzero(labels == 3) * voxel_ml
        rv = np.count_nonzero(labels == 1) * voxel_ml
        mass = np.count_nonzero(labels == 2) * voxel_ml * 1.05
        assert lv == pytest.approx(float(row["lvesv" if es else "lvedv"]), rel=0.05), row
        assert rv == pytest.approx(float(row["rvesv" if es else "rvedv"]), rel=0.05), row
        assert mass == pytest.approx(float(row["lv_mass"]), rel=0.05), row


def test_attributes_in_range_and_consistent(cohort: Path) -> None:
    by_subject: dict[str, list[dict[str, str]]] = {}
    for _, row in all_rows(cohort):
        values = {k: float(row[k]) for k in RANGES}
        for key, (low, high) in RANGES.items():
            assert low <= values[key] <= high, (key, row)
        for side in ("lv", "rv"):
            edv, esv = values[f"{side}edv"], values[f"{side}esv"]
            assert values[f"{side}ef"] == pytest.approx(100 * (edv - esv) / edv, abs=0.06)
        assert row["sex"] in ("0", "1") and row["phase"] in ("0", "1")
        assert values["wall_es"] > values["wall_ed"]  # systolic thickening
        by_subject.setdefault(row["subject"], []).append(row)
    for ed, es in by_subject.values():
        assert [ed[c] for c in SUBJECT_LEVEL] == [es[c] for c in SUBJECT_LEVEL]


def test_nifti_geometry(cohort: Path) -> None:
    profiles = {p.name: p for p in [phantoms.PUBLIC, *phantoms.site_profiles(3, 3)]}
    for folder, row in all_rows(cohort):
        volume, image = load(folder / row["image"])
        labels, label_image = load(folder / row["label"])
        assert volume.dtype == np.float32 and labels.dtype == np.uint8
        assert volume.shape == labels.shape and np.array_equal(image.affine, label_image.affine)
        profile = profiles[folder.name]
        assert volume.shape == (profile.matrix, profile.matrix, profile.slices)
        zooms = image.header.get_zooms()
        assert zooms[:2] == pytest.approx((profile.pixel_mm, profile.pixel_mm))
        assert 8.0 <= zooms[2] <= 11.0
        assert np.allclose(np.linalg.norm(image.affine[:3, :3], axis=0), zooms, atol=1e-5)
        # stored in the short-axis frame: the reader returns the array as it is
        assert np.array_equal(short_axis_ornt(image.affine, volume.shape), IDENTITY)
        centre = image.affine @ [*((np.asarray(volume.shape) - 1) / 2), 1]
        assert np.allclose(centre[:3], 0, atol=1e-3)
        assert image.header.get_xyzt_units()[0] == "mm"
        assert int(image.header["sform_code"]) == 1 and int(image.header["qform_code"]) == 1
        assert set(np.unique(labels)) <= {0, 1, 2, 3, 4, 5}
        assert np.isfinite(volume).all() and volume.min() >= 0


def test_apex_lies_left_anterior_inferior_of_the_base(cohort: Path) -> None:
    """In world (RAS+) coordinates, from the basal to the apical LV cavity slice."""
    for folder, row in all_rows(cohort):
        labels, image = load(folder / row["label"])
        cavity = np.flatnonzero((labels == 3).any(axis=(0, 1)))
        centres = [
            image.affine @ [*np.argwhere(labels[:, :, k] == 3).mean(axis=0), k, 1]
            for k in (cavity[0], cavity[-1])
        ]
        to_apex = (centres[1] - centres[0])[:3]
        assert to_apex[0] < 0 and to_apex[1] > 0 and to_apex[2] < 0, (row["label"], to_apex)


def test_anatomy_is_a_heart(cohort: Path) -> None:
    for folder, row in all_rows(cohort):
        labels, _ = load(folder / row["label"])
        volume, _ = load(folder / row["image"])
        assert not (labels[:, :, 0] == 3).any()  # slice 0 lies above the base
        area = (labels == 3).sum(axis=(0, 1))
        cavity = np.flatnonzero(area)
        assert not np.isin(labels[:, :, -1], (2, 3)).any()  # the whole LV fits, apex included
        assert np.all(np.diff(area[cavity[0] :]) <= 0)  # base to apex: the cavity narrows
        # The blood pool is ringed by myocardium: no LV blood touches anything else.
        lv = labels == 3
        for shift in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            neighbour = np.roll(labels, shift, axis=(0, 1))
            assert np.isin(neighbour[lv], (2, 3)).all()
        mid = cavity[len(cavity) // 2]
        xs = np.nonzero(labels[:, :, mid] == 3)[1]
        rx = np.nonzero(labels[:, :, mid] == 1)[1]
        assert rx.mean() < xs.mean()  # RV on the septal (image left) side
        lungs_x = np.nonzero(labels[:, :, mid] == 5)[1]
        assert lungs_x.min() < rx.min() and lungs_x.max() > xs.max()  # lungs on both sides
        blood, myo = np.median(volume[lv]), np.median(volume[labels == 2])
        assert blood > 1.8 * myo and blood > 4 * np.median(volume[labels == 5])


def test_deterministic_by_seed(tmp_path: Path) -> None:
    def make(name: str, seed: int) -> Path:
        generate_cohorts(tmp_path / name, 1, 2, seed, public_subjects=1, progress=False)
        return tmp_path / name

    a, b, c = make("a", 5), make("b", 5), make("c", 6)
    for name in ("public", "site-1"):
        text = (a / name / "manifest.csv").read_text()
        assert text == (b / name / "manifest.csv").read_text()
        assert text != (c / name / "manifest.csv").read_text()
        for row in read_manifest(a / name):
            for key in ("image", "label"):
                first = load(a / name / row[key])[0]
                assert np.array_equal(first, load(b / name / row[key])[0])
                other = load(c / name / row[key])[0]
                assert first.shape != other.shape or not np.array_equal(first, other)


def test_sites_are_not_iid(cohort: Path) -> None:
    shapes, blood = {}, {}
    for folder, row in all_rows(cohort):
        volume, _ = load(folder / row["image"])
        labels, _ = load(folder / row["label"])
        shapes[folder.name] = volume.shape
        blood.setdefault(folder.name, []).append(np.median(volume[labels == 3]))
    assert len({s[2] for s in shapes.values()}) == 4  # slice counts differ
    assert len({s[0] for s in shapes.values()}) >= 3  # in-plane matrices differ
    levels = sorted(float(np.mean(v)) for v in blood.values())
    assert all(hi > 1.5 * lo for lo, hi in itertools.pairwise(levels))  # gains


def test_attribute_distributions_are_correlated_and_site_specific() -> None:
    def draw(profile: phantoms.SiteProfile, n: int = 600) -> list[phantoms.Clinical]:
        rng = np.random.default_rng(0)
        return [phantoms.draw_clinical(rng, profile) for _ in range(n)]

    site1, site2 = draw(phantoms.BASE_SITES[0]), draw(phantoms.BASE_SITES[1])
    men = [c.lvedv for c in site1 if c.sex]
    women = [c.lvedv for c in site1 if not c.sex]
    assert np.mean(men) > 1.1 * np.mean(women)  # sex -> body size -> LVEDV
    age = np.array([c.age for c in site1])
    healthy = [c.disease == "healthy" for c in site1]
    assert np.corrcoef(age[healthy], [c.lvedv for c in site1 if c.disease == "healthy"])[0, 1] < 0
    ef1, ef2 = np.mean([c.lvef for c in site1]), np.mean([c.lvef for c in site2])
    assert ef2 < ef1 - 5  # the heart-failure site has more low-EF patients
    assert np.mean([c.age for c in site2]) > np.mean(age) + 5


def test_derived_site_profiles_follow_the_seed() -> None:
    assert phantoms.site_profiles(6, 1) == phantoms.site_profiles(6, 1)
    assert phantoms.site_profiles(6, 1)[3:] != phantoms.site_profiles(6, 2)[3:]
    assert phantoms.site_profiles(6, 1)[:3] == list(phantoms.BASE_SITES)
    assert [p.name for p in phantoms.site_profiles(5, 0)] == [f"site-{k}" for k in range(1, 6)]


@pytest.mark.parametrize(
    ("sites", "subjects", "public", "seed"),
    [(0, 2, None, 0), (1, 0, None, 0), (1, 2, 0, 0), (1, 2, None, -1), (-3, 2, None, 0)],
)
def test_bad_arguments_are_refused(
    tmp_path: Path, sites: int, subjects: int, public: int | None, seed: int
) -> None:
    with pytest.raises(FedsynthError):
        generate_cohorts(tmp_path / "out", sites, subjects, seed, public, progress=False)
    assert not (tmp_path / "out").exists()


def test_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    phantoms_cmd.add_arguments(parser)
    argv = f"--out {tmp_path} --sites 2 --subjects 1 --public-subjects 1 --seed 4 --quiet"
    args = parser.parse_args(argv.split())
    assert phantoms_cmd.run(args) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1
    assert len(read_manifest(tmp_path / "site-2")) == 2
    defaults = parser.parse_args(["--out", "x"])
    assert (defaults.sites, defaults.subjects, defaults.public_subjects, defaults.seed) == (
        3,
        20,
        None,
        0,
    )
    assert "\n" not in phantoms_cmd.HELP


def test_command_module_imports_light() -> None:
    code = "import sys, fedsynth.simulations.phantoms_cmd; print('nibabel' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_worker_processes_write_the_same_cohort(cohort, tmp_path, monkeypatch) -> None:
    """Subjects drawn in worker processes (as for large sites) are the sequential ones."""
    monkeypatch.setattr(phantoms, "PARALLEL_FROM", 1)
    monkeypatch.setattr(phantoms, "MAX_WORKERS", 2)
    assert phantoms._workers(10) == min(2, len(__import__("os").sched_getaffinity(0)))
    generate_cohorts(tmp_path, sites=3, subjects=2, seed=3, public_subjects=2, progress=False)
    for folder in FOLDERS:
        assert (tmp_path / folder / "manifest.csv").read_text() == (
            cohort / folder / "manifest.csv"
        ).read_text()
        for row in read_manifest(cohort / folder):
            ours, theirs = (
                load(tmp_path / folder / row["image"])[0],
                load(cohort / folder / row["image"])[0],
            )
            assert np.array_equal(ours, theirs), row["image"]


def test_held_out_subjects_of_the_same_sites(tmp_path) -> None:
    """Another subject seed with the same profile seed: new subjects, the same derived sites."""
    first = phantoms.site_profiles(5, 0)
    generate_cohorts(
        tmp_path, sites=5, subjects=1, seed=9, public_subjects=1, progress=False, profile_seed=0
    )
    other = phantoms.site_profiles(5, 9)  # what seed 9 alone would have drawn
    assert any(
        (a.matrix, a.slices) != (b.matrix, b.slices)
        for a, b in zip(first[3:], other[3:], strict=True)
    )
    shapes = {}
    for k in (4, 5):
        [row, _] = read_manifest(tmp_path / f"site-{k}")
        shapes[k] = load(tmp_path / f"site-{k}" / row["image"])[0].shape
        assert shapes[k][:2] == (first[k - 1].matrix, first[k - 1].matrix)
        assert shapes[k][2] == first[k - 1].slices
