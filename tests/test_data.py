"""A site's data: every kind of bad row is rejected with its reason; good data of any size
or orientation is resampled to the model's shape; the site folder is only ever read."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from sitefiles import GOOD_ATTRIBUTES, blob_volume, save_nifti, write_site

from fedsynth.common.config import load_config
from fedsynth.common.data import (
    SiteDataset,
    check_site,
    load_volume,
    open_site,
    place_labels,
    read_labels,
)
from fedsynth.common.errors import FedsynthError
from fedsynth.common.orientation import short_axis_affine


def make_bad_files(root):
    """One file per way a volume can be broken; returns {name: expected reason fragment}."""
    img = root / "img"
    good = save_nifti(img / "good.nii.gz", blob_volume())
    raw = good.read_bytes()
    (img / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    (img / "text.nii.gz").write_text("this is not an image")
    (img / "plain.nii").write_bytes(gzip.decompress(raw)[:400])
    (img / "random.nii").write_bytes(np.random.default_rng(0).bytes(2000))
    (img / "scan.png").write_bytes(b"\x89PNG....")
    save_nifti(img / "four_d.nii.gz", np.stack([blob_volume()] * 3, axis=-1))
    save_nifti(img / "two_d.nii.gz", blob_volume()[:, :, 0])
    nan = blob_volume()
    nan[3, 3, 3] = np.nan
    save_nifti(img / "nan.nii.gz", nan)
    inf = blob_volume()
    inf[1, 2, 3] = np.inf
    save_nifti(img / "inf.nii.gz", inf)
    save_nifti(img / "constant.nii.gz", np.full((24, 20, 6), 7.0, np.float32))
    header = bytearray(gzip.decompress(raw))
    header[76 + 4 * 2 : 76 + 4 * 3] = np.float32(0.0).tobytes()  # pixdim[2]: spacing of axis y
    (img / "zero_spacing.nii").write_bytes(bytes(header))
    return {
        "missing.nii.gz": "file not found",
        "truncated.nii.gz": "truncated or corrupt file",
        "text.nii.gz": "not a readable NIfTI file",
        "plain.nii": "truncated or corrupt file (the header claims 24x20x6 voxels, 11520 bytes; "
        "the file holds 48)",
        "random.nii": "not a readable NIfTI file",
        "scan.png": "not a NIfTI file name",
        "four_d.nii.gz": "has 4 dimensions (24x20x6x3): a cine?",
        "two_d.nii.gz": "has 2 dimensions",
        "nan.nii.gz": "contains 1 NaN/Inf voxels",
        "inf.nii.gz": "contains 1 NaN/Inf voxels",
        "constant.nii.gz": "constant image (every voxel is 7)",
        "zero_spacing.nii": "invalid voxel spacing",
    }


def test_every_bad_volume_is_rejected_with_its_reason(tmp_path, tiny_config):
    site = tmp_path / "site"
    expected = make_bad_files(site)
    rows = [{"image": "img/good.nii.gz", "subject": "s0"}]
    rows += [{"image": f"img/{name}", "subject": f"s{i + 1}"} for i, name in enumerate(expected)]
    write_site(site, rows)
    result = check_site(site, tiny_config.data, show_progress=False)
    assert [r.row for r in result.records] == [1]
    reasons = {r.file: r.reason for r in result.rejected}
    assert set(reasons) == {f"img/{name}" for name in expected}
    for name, fragment in expected.items():
        assert fragment in reasons[f"img/{name}"], (name, reasons[f"img/{name}"])
    assert [r.row for r in result.rejected] == list(range(2, len(expected) + 2))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"lvef": ""}, "attribute lvef is missing"),
        ({"lvef": "sixty"}, "attribute lvef = 'sixty' is not a number"),
        ({"lvef": "nan"}, "attribute lvef = nan is not finite"),
        ({"lvef": 95}, "attribute lvef = 95 is outside [10, 85] %"),
        ({"age": 7}, "attribute age = 7 is outside [18, 95] years"),
        ({"sex": 0.5}, "attribute sex must be 0 (female) or 1 (male); found '0.5'"),
        ({"phase": 2}, "attribute phase must be 0 (ED) or 1 (ES); found '2'"),
        ({"subject": ""}, "no subject id"),
        ({"image": ""}, "no image path"),
    ],
)
def test_bad_attributes_and_cells_are_rejected(tmp_path, tiny_config, change, reason):
    site = tmp_path / "site"
    save_nifti(site / "a.nii.gz", blob_volume())
    write_site(site, [{"image": "a.nii.gz", "subject": "s1", **change}])
    result = check_site(site, tiny_config.data, show_progress=False)
    assert not result.records
    assert [r.row for r in result.rejected] == [1]
    assert reason in result.rejected[0].reason


def test_duplicates_and_ragged_rows(tmp_path, tiny_config):
    site = tmp_path / "site"
    save_nifti(site / "a.nii.gz", blob_volume(seed=1))
    save_nifti(site / "b.nii.gz", blob_volume(seed=2))
    (site / "copy_of_a.nii.gz").write_bytes((site / "a.nii.gz").read_bytes())
    write_site(
        site,
        [
            {"image": "a.nii.gz", "subject": "s1"},
            {"image": "b.nii.gz", "subject": "s2"},
            {"image": "./a.nii.gz", "subject": "s3"},
            {"image": "copy_of_a.nii.gz", "subject": "s4"},
        ],
    )
    with (site / "manifest.csv").open("a") as f:
        f.write("b.nii.gz,s5,1,2\n")
    result = check_site(site, tiny_config.data, show_progress=False)
    assert [r.row for r in result.records] == [1, 2]
    reasons = {r.row: r.reason for r in result.rejected}
    assert (
        reasons[3]
        == "duplicate of row 1 (same image); subject ids 's1' and 's3' count as one subject"
    )
    assert (
        reasons[4]
        == "duplicate of row 1 (same voxels); subject ids 's1' and 's4' count as one subject"
    )
    assert "different number of fields" in reasons[5]


def test_manifest_problems_are_one_clear_error(tmp_path, tiny_config):
    with pytest.raises(FedsynthError, match="is not a folder"):
        check_site(tmp_path / "nowhere", tiny_config.data)
    site = tmp_path / "site"
    site.mkdir()
    with pytest.raises(FedsynthError, match=r"no manifest\.csv in"):
        check_site(site, tiny_config.data)
    columns = ["image", "subject", *[c for c in GOOD_ATTRIBUTES if c not in ("lvef", "age")]]
    write_site(site, [{"image": "a.nii.gz"}], columns=columns)
    with pytest.raises(FedsynthError, match=r"lacks required column\(s\) lvef, age"):
        check_site(site, tiny_config.data)
    (site / "manifest.csv").write_bytes(b"\xff\xfe\x00garbage\x00\xff")
    with pytest.raises(FedsynthError, match=r"manifest\.csv"):
        check_site(site, tiny_config.data)


def test_other_size_and_orientation_resample_to_the_same_volume(tmp_path, tiny_config):
    """The same anatomy stored LPS instead of RAS, at another size, reaches the model alike."""
    data = blob_volume((40, 36, 10))
    data[5:12, 5:12, 1:4] = 3.0  # a marker in one corner, to see any flip
    ras = save_nifti(tmp_path / "ras.nii.gz", data, zooms=(3.0, 3.0, 9.0))
    lps_affine = np.diag([-3.0, -3.0, 9.0, 1.0])
    lps_affine[:3, 3] = [3.0 * 39, 3.0 * 35, 0]
    lps = save_nifti(tmp_path / "lps.nii.gz", data[::-1, ::-1, :].copy(), affine=lps_affine)
    a, b = load_volume(ras, tiny_config.data), load_volume(lps, tiny_config.data)
    assert a.shape == b.shape == (1, *tiny_config.data.shape)
    assert a.dtype == torch.float32 and float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    torch.testing.assert_close(a, b)
    # the marker (left, posterior, inferior) lands in the short-axis frame's corner: last rows
    # (posterior), last columns (patient's left), apical half (inferior); orientation.py
    h, w, d = tiny_config.data.shape
    assert a[0, -h // 3 :, -w // 3 :, d // 2 :].mean() > a[0, : h // 3, : w // 3, d // 2 :].mean()


def test_dataset_groups_subjects_and_scales_attributes_by_declared_range(tmp_path, tiny_config):
    site = tmp_path / "site"
    rows = []
    for i in range(3):
        for phase in (0, 1):
            save_nifti(site / f"s{i}_{phase}.nii.gz", blob_volume(seed=10 * i + phase))
            rows.append(
                {
                    "image": f"s{i}_{phase}.nii.gz",
                    "subject": f"sub{i}",
                    "phase": phase,
                    "lvef": 10 + 25 * i,
                    "lvesv": 150 - 1.5 * (10 + 25 * i),  # lvedv 150: the volumes give the EF
                }
            )
    write_site(site, rows)
    dataset, manifest = open_site(site, tiny_config.data, show_progress=False)
    assert manifest.warnings == []
    assert len(dataset) == 6
    assert sorted(map(sorted, dataset.subject_rows)) == [[0, 1], [2, 3], [4, 5]]
    volume, attrs = dataset[3]
    assert volume.shape == (1, 32, 32, 8)
    names = [a.name for a in tiny_config.data.attributes]
    assert attrs.shape == (len(names),)
    # lvef 35 in the declared range [10, 85]; phase 1 in [0, 1]; lvedv 150 in [40, 400]
    assert attrs[names.index("lvef")].item() == pytest.approx((35 - 10) / 75)
    assert attrs[names.index("phase")].item() == 1.0
    assert attrs[names.index("lvedv")].item() == pytest.approx((150 - 40) / 360)


def test_without_subject_column_each_row_is_a_subject_and_a_warning_says_so(tmp_path, tiny_config):
    site = tmp_path / "site"
    for i in range(2):
        save_nifti(site / f"{i}.nii.gz", blob_volume(seed=i))
    columns = ["image", *GOOD_ATTRIBUTES]
    write_site(site, [{"image": "0.nii.gz"}, {"image": "1.nii.gz"}], columns=columns)
    dataset = SiteDataset(check_site(site, tiny_config.data, show_progress=False), tiny_config.data)
    assert dataset.subject_rows == [[0], [1]]
    result = check_site(site, tiny_config.data, show_progress=False)
    assert any("no 'subject' column" in w for w in result.site_warnings)


def test_open_site_refuses_a_site_with_no_usable_row(tmp_path, tiny_config):
    site = write_site(tmp_path / "site", [{"image": "gone.nii.gz", "subject": "s"}])
    with pytest.raises(FedsynthError, match=r"no usable rows .*file not found"):
        open_site(site, tiny_config.data, show_progress=False)


def snapshot(root):
    return {
        p.relative_to(root): (p.stat().st_mtime_ns, p.stat().st_size, p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    } | {"dirs": sorted(str(p) for p in root.rglob("*") if p.is_dir())}


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "fedsynth.common.cli", *args], capture_output=True, text=True
    )


def test_site_check_cli_json_and_read_only(tmp_path):
    site = tmp_path / "site"
    expected = make_bad_files(site)
    rows = [{"image": "img/good.nii.gz", "subject": "s0"}]
    rows += [{"image": f"img/{name}", "subject": f"s{i + 1}"} for i, name in enumerate(expected)]
    write_site(site, rows)
    before = snapshot(site)
    proc = run_cli("site-check", "--data-path", str(site), "--config", "tiny", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["usable"] == 1 and report["subjects"] == 1
    assert len(report["rejected"]) == len(expected)
    assert {"row", "file", "reason"} == set(report["rejected"][0])
    assert snapshot(site) == before
    assert not any("privacy.delta" in w for w in report["site_warnings"])


def test_site_check_warns_when_delta_is_not_below_one_over_subjects(tmp_path):
    site = tmp_path / "site"
    for i in range(2):
        save_nifti(site / f"{i}.nii.gz", blob_volume(seed=i))
    write_site(site, [{"image": f"{i}.nii.gz", "subject": f"s{i}"} for i in range(2)])
    proc = run_cli(
        "site-check", "--data-path", str(site), "--json", "--config", str(delta_config(tmp_path))
    )
    assert proc.returncode == 0
    warnings = " ".join(json.loads(proc.stdout)["site_warnings"])
    assert "privacy.delta 0.5 is not below 1/2 subjects" in warnings


def delta_config(tmp_path):
    path = tmp_path / "delta.yaml"
    path.write_text("base: tiny\nprivacy:\n  delta: 0.5\n")
    return path


def test_site_check_cli_no_usable_rows_is_one_line_and_nonzero(tmp_path):
    site = write_site(tmp_path / "site", [{"image": "gone.nii.gz", "subject": "s"}])
    proc = run_cli("site-check", "--data-path", str(site), "--config", "tiny", "--json")
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["usable"] == 0
    assert proc.stderr.count("\n") == 1 and "no usable rows" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli("site-check", "--data-path", str(tmp_path / "none"))
    assert proc.returncode == 1 and proc.stderr.strip().endswith("is not a folder")


def test_manifest_paths_must_stay_inside_the_site_folder(tmp_path, tiny_config):
    """`..`, absolute paths and symlinks (file or folder) that leave the site are refused;
    a symlink that stays inside is followed. Each bad row is its own rejection."""
    site, other = tmp_path / "site", tmp_path / "other"
    for i, folder in enumerate((site / "img", other)):
        save_nifti(folder / "x.nii.gz", blob_volume(seed=i))
    save_nifti(other / "y.nii.gz", blob_volume(seed=5))
    (site / "out.nii.gz").symlink_to(other / "y.nii.gz")
    (site / "outdir").symlink_to(other, target_is_directory=True)
    (site / "alias.nii.gz").symlink_to(site / "img" / "x.nii.gz")
    (site / "imgdir").symlink_to(site / "img", target_is_directory=True)
    save_nifti(site / "img" / "z.nii.gz", blob_volume(seed=7))
    write_site(
        site,
        [
            {"image": "img/x.nii.gz", "subject": "s1"},
            {"image": "../other/x.nii.gz", "subject": "s2"},
            {"image": str(other / "x.nii.gz"), "subject": "s3"},
            {"image": str(site / "img" / "z.nii.gz"), "subject": "s4"},
            {"image": "out.nii.gz", "subject": "s5"},
            {"image": "outdir/y.nii.gz", "subject": "s6"},
            {"image": "img/../../other/x.nii.gz", "subject": "s7"},
            {"image": "imgdir/z.nii.gz", "subject": "s8"},
            {"image": "alias.nii.gz", "subject": "s9"},
            {"image": "img/x.nii.gz", "label": "../other/x.nii.gz", "subject": "s10"},
        ],
        columns=["image", "label", "subject", *GOOD_ATTRIBUTES],
    )
    result = check_site(site, tiny_config.data, show_progress=False)
    reasons = {r.row: r.reason for r in result.rejected}
    assert [r.row for r in result.records] == [1, 8]
    assert result.records[1].image == site / "img" / "z.nii.gz"
    assert reasons == {
        2: "image path leads out of the site folder (..)",
        3: "image path is absolute: give it relative to the site folder",
        4: "image path is absolute: give it relative to the site folder",
        5: "image path leads out of the site folder through a symlink",
        6: "image path leads out of the site folder through a symlink",
        7: "image path leads out of the site folder (..)",
        # inside the folder: followed, then deduplicated
        9: "duplicate of row 1 (same image); subject ids 's1' and 's9' count as one subject",
        10: "label path leads out of the site folder (..)",
    }


def write_manifest(site, header, row):
    site.mkdir(parents=True, exist_ok=True)
    (site / "manifest.csv").write_text(f"{header}\n{row}\n")
    return site


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda h, r: (f"{h},phase", f"{r},0"), r"column 'phase' appears twice; keep one"),
        (lambda h, r: (f"{h},LVEF", f"{r},60"), r"columns 'lvef' and 'LVEF' differ only in case"),
        (
            lambda h, r: (h.replace("lvedv", "LVEDV").replace(",age,", ",Age,"), r),
            r"lacks required column\(s\) lvedv, age \(.*\); column 'LVEDV' differs only in case "
            r"from 'lvedv', column 'Age' differs only in case from 'age'$",
        ),
        (
            lambda h, r: (h.replace(",", ";"), r.replace(",", ";")),
            r"lacks required column\(s\) image, .*; the file looks ;-separated: save it with "
            r"commas$",
        ),
        (
            lambda h, r: (h.replace(",", "\t"), r.replace(",", "\t")),
            r"the file looks tab-separated: save it with commas$",
        ),
        (
            lambda h, r: (h.replace("subject", "Subject"), r),
            r"column 'Subject' differs only in case from the optional column 'subject', which "
            r"is read only as 'subject': rename it$",
        ),
        (
            lambda h, r: (f"{h},Label", f"{r},lab.nii.gz"),
            r"column 'Label' differs only in case from the optional column 'label'",
        ),
    ],
    ids=[
        "twice",
        "case-twice",
        "case-missing",
        "semicolons",
        "tabs",
        "optional-subject-case",
        "optional-label-case",
    ],
)
def test_a_header_that_cannot_be_read_right_is_refused_saying_why(
    tmp_path, tiny_config, change, message
):
    """A column named twice (even in another case) is refused as a whole, never resolved by
    taking one copy; a missing column says what is likely wrong. An optional column spelt
    in another case ('Subject', 'Label', as a spreadsheet heads them) is refused naming it:
    read as absent, every row would count as its own subject (one person's scans as
    several privacy units) or be placed without its label map, without a word."""
    columns = ["image", "subject", *GOOD_ATTRIBUTES]
    values = ["a.nii.gz", "s1", *map(str, GOOD_ATTRIBUTES.values())]
    site = write_manifest(tmp_path / "site", *change(",".join(columns), ",".join(values)))
    with pytest.raises(FedsynthError, match=message):
        check_site(site, tiny_config.data, show_progress=False)


def test_a_windows_path_is_rejected_saying_so(tmp_path, tiny_config):
    site = tmp_path / "site"
    save_nifti(site / "img" / "a.nii.gz", blob_volume())
    write_site(
        site,
        [
            {"image": "img\\a.nii.gz", "subject": "s1"},
            {"image": "..\\other\\a.nii.gz", "subject": "s2"},
            {"image": "img/a.nii.gz", "subject": "s3"},
        ],
    )
    result = check_site(site, tiny_config.data, show_progress=False)
    assert [r.row for r in result.records] == [3]
    assert [r.reason for r in result.rejected] == [
        "image file not found: the path uses backslashes (use /)",
        "image path leads out of the site folder (..)",
    ]


@pytest.mark.slow  # a CLI subprocess (10 s on 2 shared cores); the in-process tests cover it
def test_site_check_cli_refuses_a_duplicated_column_in_one_line(tmp_path):
    """The phase column twice: the last copy used to win silently (every row trained as ED)."""
    site = tmp_path / "site"
    rows = []
    for i in range(2):
        save_nifti(site / f"{i}.nii.gz", blob_volume(seed=i))
        rows.append(",".join([f"{i}.nii.gz", "s1", *map(str, GOOD_ATTRIBUTES.values())]))
    header = ",".join(["image", "subject", *GOOD_ATTRIBUTES, "phase"])
    (site / "manifest.csv").write_text("\n".join([header, f"{rows[0]},0", f"{rows[1]},0"]) + "\n")
    proc = run_cli("site-check", "--data-path", str(site), "--config", "tiny", "--json")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.strip().endswith("column 'phase' appears twice; keep one")


def test_a_site_opened_to_be_encoded_reads_each_file_once(tmp_path, monkeypatch):
    """keep_volumes: the checked volumes are the ones the dataset gives, with no re-read."""
    from fedsynth.common import data as data_module
    from fedsynth.simulations.phantoms import generate_cohorts

    generate_cohorts(tmp_path, sites=1, subjects=2, seed=1, public_subjects=1, progress=False)
    from fedsynth.common.config import load_config

    config = load_config("tiny").data
    plain, _ = data_module.open_site(tmp_path / "site-1", config, show_progress=False)
    expected = [plain[i] for i in range(len(plain))]  # read from the files again
    reads = []
    original = data_module.read_image
    monkeypatch.setattr(data_module, "read_image", lambda *a: reads.append(a) or original(*a))
    kept, _ = data_module.open_site(
        tmp_path / "site-1", config, show_progress=False, keep_volumes=True
    )
    assert len(reads) == len(kept) == 4  # the check's reads only
    for i, (volume, attributes) in enumerate(expected):
        assert torch.equal(kept[i][0], volume) and torch.equal(kept[i][1], attributes)
    assert len(reads) == 4  # and none while iterating


RV_NORMAL = np.array([-0.45, 0.75, -0.48])  # an oblique LV long axis
RV_MATRIX = (128, 128, 14)  # 1.5 mm pixels, 8 mm slices: 192 x 192 x 112 mm


def heart_with_rv(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(magnitude image, labels in fedsynth's numbering, affine): an ellipsoidal LV cavity
    (3) in a myocardial shell (2), an RV (1) beside it towards low column indices, in a
    body of tissue, in an oblique stack; Rician-like noise, so the image has thousands of
    values."""
    spacing = (1.5, 1.5, 8.0)
    affine = short_axis_affine(spacing, RV_MATRIX, RV_NORMAL)
    axes = [(np.arange(n) - (n - 1) / 2) * d for n, d in zip(RV_MATRIX, spacing, strict=True)]
    u, v, w = np.meshgrid(*axes, indexing="ij", sparse=True)
    w = w - 8.0  # the heart a little below the stack's middle
    labels = np.zeros(RV_MATRIX, np.uint8)
    labels[(u / 38) ** 2 + ((v + 42) / 24) ** 2 + (w / 40) ** 2 <= 1] = 1
    labels[(u / 33) ** 2 + (v / 33) ** 2 + (w / 48) ** 2 <= 1] = 2
    labels[(u / 25) ** 2 + (v / 25) ** 2 + (w / 40) ** 2 <= 1] = 3
    rng = np.random.default_rng(seed)
    image = np.array([0.0, 900.0, 250.0, 1000.0], np.float32)[labels]
    image[(labels == 0) & (u**2 + v**2 <= 90.0**2)] = 120.0
    noise = rng.normal(0, 15, RV_MATRIX) + 1j * rng.normal(0, 15, RV_MATRIX)
    return np.abs(image + noise).astype(np.float32), labels, affine


def labelled_site(root: Path, label: np.ndarray, label_affine: np.ndarray | None = None) -> Path:
    """A site of one row (the heart_with_rv image) whose `label` column names `label`."""
    image, _, affine = heart_with_rv()
    root.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, affine), root / "h.nii.gz")
    label_affine = affine if label_affine is None else label_affine
    nib.save(nib.Nifti1Image(label, label_affine), root / "h_gt.nii.gz")
    rows = [{"image": "h.nii.gz", "label": "h_gt.nii.gz", "subject": "h"}]
    return write_site(root, rows, columns=["image", "label", "subject", *GOOD_ATTRIBUTES])


def label_refusal(root: Path, label: np.ndarray) -> str:
    """Row 1's reason for refusal, the same heart in fedsynth's numbering accepted without
    a word first (so the reason is about the numbering)."""
    data_cfg = load_config("tiny").data
    control = labelled_site(root / "control", heart_with_rv()[1])
    control = check_site(control, data_cfg, show_progress=False)
    assert len(control.records) == 1 and not control.warnings
    manifest = check_site(labelled_site(root / "site", label), data_cfg, show_progress=False)
    assert [r.row for r in manifest.rejected] == [1], manifest.warnings
    return manifest.rejected[0].reason


def test_a_label_map_numbered_the_mnms_way_is_refused(tmp_path):
    """A label map numbered as M&Ms / UK Biobank (1 LV blood pool, 3 RV) would train the
    anatomy meter on the RV as the LV: refused, told by the label the myocardium encloses,
    naming the label file and the way to renumber it."""
    labels = heart_with_rv()[1]
    reason = label_refusal(tmp_path, np.array([0, 3, 2, 1], np.uint8)[labels])
    assert reason.startswith("label h_gt.nii.gz: label 1, not 3, is what the myocardium")
    assert "M&Ms" in reason and "fedsynth import" in reason


def test_a_binary_mask_in_the_label_column_is_refused(tmp_path):
    """An LV mask (0/1, what contouring tools export) would be read as the RV: refused."""
    mask = (heart_with_rv()[1] == 3).astype(np.uint8)
    reason = label_refusal(tmp_path, mask)
    assert "binary mask" in reason and "renumber" in reason


def test_an_image_in_the_label_column_is_refused_as_no_label_map(tmp_path):
    """An MR image in the label column (the image column copied) is not a label map."""
    reason = label_refusal(tmp_path, heart_with_rv(seed=1)[0])
    assert reason == "label h_gt.nii.gz: holds non-integer values: an image, not a label map"


def test_a_label_map_cropped_around_the_heart_is_placed_by_its_affine(tmp_path):
    """A segmentation saved cropped to the heart (a smaller matrix, its origin moved by the
    crop: the same voxels in the same place) is used, and lands on the grid as the uncropped
    label map does (it was refused as not lying on the image's voxel grid)."""
    _, labels, affine = heart_with_rv()
    crop = (slice(24, 104), slice(8, 100), slice(1, 13))
    cropped_affine = affine.copy()
    cropped_affine[:3, 3] = affine[:3, :3] @ np.array([24, 8, 1]) + affine[:3, 3]
    data_cfg = load_config("tiny").data
    site = labelled_site(tmp_path, np.ascontiguousarray(labels[crop]), cropped_affine)
    manifest = check_site(site, data_cfg, show_progress=False)
    assert not manifest.rejected and not manifest.warnings, manifest.rejected
    whole = np.zeros(RV_MATRIX, np.uint8)
    whole[crop] = labels[crop]
    nib.save(nib.Nifti1Image(whole, affine), tmp_path / "whole.nii.gz")
    expected = place_labels(read_labels(tmp_path / "whole.nii.gz"), data_cfg)
    stack = (affine, RV_MATRIX)
    placed = place_labels(read_labels(tmp_path / "h_gt.nii.gz"), data_cfg, stack)
    assert torch.equal(placed, expected)


def test_a_4d_cine_in_the_image_column_points_to_the_importer(tmp_path, tiny_config):
    """dcm2niix's 4D cine (x, y, slices, frames) listed as an image: the reason names
    `fedsynth import --layout cine` (one 3D volume per phase), not only the dimensions."""
    frames = np.stack([blob_volume((48, 40, 12), seed=t) for t in range(5)], axis=-1)
    save_nifti(tmp_path / "cine.nii.gz", frames, zooms=(2, 2, 8))
    rows = [{"image": "cine.nii.gz", "subject": "P1"}]
    manifest = check_site(write_site(tmp_path, rows), tiny_config.data, show_progress=False)
    assert [r.row for r in manifest.rejected] == [1]
    assert "fedsynth import --layout cine" in manifest.rejected[0].reason


@pytest.mark.parametrize(
    ("shape", "said"),
    [
        ((48, 40, 1), "holds a single slice (48x40x1), not a short-axis stack"),
        ((48, 40, 1, 6), "a single-slice cine (48x40x1x6: one slice location, 6 frames)"),
    ],
)
def test_a_single_slice_file_says_it_is_one_slice_of_a_stack(tmp_path, tiny_config, shape, said):
    """dcm2niix writes a stack acquired slice by slice as one file per slice location: the
    reason says it is one slice and that a stack's slices must be one volume (it read as a
    broken file: "too small; need 2+ voxels per axis")."""
    volume = (
        blob_volume(shape[:3])
        if len(shape) == 3
        else np.stack([blob_volume(shape[:3], seed=t) for t in range(shape[3])], axis=-1)
    )
    save_nifti(tmp_path / "slice07.nii.gz", volume, zooms=(2, 2, 8))
    rows = [{"image": "slice07.nii.gz", "subject": "P1"}]
    manifest = check_site(write_site(tmp_path, rows), tiny_config.data, show_progress=False)
    assert [r.row for r in manifest.rejected] == [1]
    assert said in manifest.rejected[0].reason
    assert "the slices of one stack must be one 3D volume" in manifest.rejected[0].reason


def test_a_single_slice_cine_squeezed_to_3d_is_not_read_as_a_stack(tmp_path, tiny_config):
    """25 cardiac phases of one slice location (64x64x1x25) squeezed to 64x64x25 with an 8 mm
    slice thickness: not read silently as a 200 mm stack of 25 slices (the model would learn
    a cylinder); a 200 mm stack of a heart is accepted without that warning."""
    rng = np.random.default_rng(0)
    y, x = np.meshgrid(np.arange(64) - 31.5, np.arange(64) - 31.5, indexing="ij")
    frames = []
    for t in range(25):
        radius = 12 - 4 * np.sin(np.pi * t / 24)  # the cavity contracts and relaxes
        cavity = (y**2 + x**2 <= radius**2) * 1.0
        wall = ((y**2 + x**2 <= (radius + 5) ** 2) & (cavity == 0)) * 0.3
        body = (y**2 + x**2 <= 30**2) * 0.1
        frames.append(np.maximum(cavity + wall, body) + 0.02 * rng.random((64, 64)))
    save_nifti(tmp_path / "cine_slice5.nii.gz", np.stack(frames, -1).astype(np.float32), (2, 2, 8))
    image, _, affine = heart_with_rv()
    tall = np.concatenate([image, image[..., :11]], axis=-1)  # 25 slices x 8 mm
    nib.save(nib.Nifti1Image(tall, affine), tmp_path / "tall.nii.gz")
    rows = [
        {"image": "cine_slice5.nii.gz", "subject": "P1"},
        {"image": "tall.nii.gz", "subject": "P2"},
    ]
    manifest = check_site(write_site(tmp_path, rows), tiny_config.data, show_progress=False)
    said = {w.row: w.reason for w in manifest.warnings if "single-slice cine" in w.reason}
    assert list(said) == [1], manifest.warnings
    assert said[1].startswith("the stack covers 200 mm along the slices (25 slices x 8 mm)")


def test_a_label_map_in_another_voxel_order_or_matrix_is_placed_by_its_affine(tmp_path):
    """The same segmentation stored in another voxel order (axes swapped and flipped) lands
    on the grid exactly as stored on the image's grid; stored on a coarser matrix (every
    other pixel, 3 mm) it lands on nearly the same voxels. Both rows are accepted."""
    _, labels, affine = heart_with_rv()
    data_cfg = load_config("tiny").data
    nib.save(nib.Nifti1Image(labels, affine), tmp_path / "same.nii.gz")
    reordered = np.ascontiguousarray(np.flip(labels.transpose(1, 0, 2), axis=2))
    flip = np.eye(4)[[1, 0, 2, 3]]  # voxel (j, i, n-1-k) of the reordered is (i, j, k)
    flip[2] = [0, 0, -1, RV_MATRIX[2] - 1]
    coarse_affine = affine.copy()
    coarse_affine[:3, :2] *= 2  # every other pixel: voxel 2i is the original's 2i
    variants = {  # (the old reader refused the coarse one, took the reordered one)
        "coarse": (np.ascontiguousarray(labels[::2, ::2]), coarse_affine),
        "reordered": (reordered, affine @ flip),
    }
    for name, (label, label_affine) in variants.items():
        site = labelled_site(tmp_path / name, label, label_affine)
        manifest = check_site(site, data_cfg, show_progress=False)
        assert not manifest.rejected and not manifest.warnings, (name, manifest.rejected)
        stack = (affine, RV_MATRIX)
        expected = place_labels(read_labels(tmp_path / "same.nii.gz"), data_cfg, stack)
        placed = place_labels(read_labels(site / "h_gt.nii.gz"), data_cfg, stack)
        if name == "reordered":
            assert torch.equal(placed, expected)
        heart, truth = placed > 0, expected > 0
        dice = 2 * float((heart & truth).sum()) / float(heart.sum() + truth.sum())
        assert dice > 0.95, (name, dice)


def test_a_float_label_map_off_by_rounding_is_a_label_map(tmp_path):
    """Labels stored as floats a rounding away from whole numbers (a header's scaling) are
    read as the labels they round to, not refused as an image."""
    labels = heart_with_rv()[1].astype(np.float32) * np.float32(1.0000001)
    manifest = check_site(
        labelled_site(tmp_path, labels), load_config("tiny").data, show_progress=False
    )
    assert len(manifest.records) == 1 and not manifest.rejected and not manifest.warnings
