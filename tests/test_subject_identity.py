"""One person is one subject: the same scan in any storage under two ids, ids that differ
only in Unicode form, case or invisible characters, and attributes that contradict each
other within a row or a subject, on generated site folders."""

from __future__ import annotations

import dataclasses
import gzip
import unicodedata

import nibabel as nib
import numpy as np
import pytest
from sitefiles import blob_volume, save_nifti, write_site

from fedsynth.client.audit import check_disjoint
from fedsynth.common.data import SiteDataset, check_site
from fedsynth.common.errors import FedsynthError
from fedsynth.common.subject_identity import normalise_id


def scan(seed: int) -> np.ndarray:
    """A blob volume on a grid of halves: int16 with scl_slope 0.5 holds it exactly."""
    return np.round(blob_volume((24, 20, 6), seed=seed) * 1000) / 2


STORAGES = (
    "plain.nii",
    "gzip.nii.gz",
    "gzip9.nii.gz",
    "int16.nii.gz",
    "float64.nii.gz",
    "lps.nii.gz",
    "slices_first.nii.gz",
)


def write_storages(root, data):
    """The scan `data` (24x20x6, RAS, 2x2x8 mm) written in seven ways that hold the same
    voxels; returns the file names."""
    affine = np.diag([2.0, 2.0, 8.0, 1.0])
    save_nifti(root / "plain.nii", data.astype(np.float32))
    save_nifti(root / "gzip.nii.gz", data.astype(np.float32))
    plain = (root / "plain.nii").read_bytes()
    (root / "gzip9.nii.gz").write_bytes(gzip.compress(plain, compresslevel=9))
    image = nib.Nifti1Image((2 * data - 2).astype(np.int16), affine)
    image.header.set_slope_inter(0.5, 1.0)  # decoded: 0.5 * stored + 1 = data
    nib.save(image, root / "int16.nii.gz")
    save_nifti(root / "float64.nii.gz", data.astype(np.float64))
    lps = np.diag([-2.0, -2.0, 8.0, 1.0])
    lps[:3, 3] = [2.0 * 23, 2.0 * 19, 0]
    save_nifti(root / "lps.nii.gz", data[::-1, ::-1, :].astype(np.float32), affine=lps)
    first = np.array([[0, 2.0, 0, 0], [0, 0, 2.0, 0], [8.0, 0, 0, 0], [0, 0, 0, 1]])
    save_nifti(
        root / "slices_first.nii.gz", data.transpose(2, 0, 1).astype(np.float32), affine=first
    )
    return STORAGES


def test_the_same_scan_in_any_storage_under_other_ids_is_one_subject(tmp_path, tiny_config):
    site = tmp_path / "site"
    names = write_storages(site, scan(1))
    assert len({(site / name).read_bytes() for name in names}) == len(names)  # all differ
    assert nib.load(site / "int16.nii.gz").get_data_dtype() == np.int16
    save_nifti(site / "p2_es.nii.gz", scan(2).astype(np.float32))
    save_nifti(site / "other.nii.gz", scan(3).astype(np.float32))
    rows = [{"image": name, "subject": f"p{i + 1}"} for i, name in enumerate(names)]
    rows += [
        {"image": "p2_es.nii.gz", "subject": "p2", "phase": 1},
        {"image": "other.nii.gz", "subject": "q"},
    ]
    write_site(site, rows)
    result = check_site(site, tiny_config.data, show_progress=False)
    assert [r.row for r in result.records] == [1, 8, 9]
    reasons = {r.row: r.reason for r in result.rejected}
    assert reasons == {
        n: f"duplicate of row 1 (same voxels); subject ids 'p1' and 'p{n}' count as one subject"
        for n in range(2, 8)
    }
    # the ES row of p2 belongs to p1's person: one privacy unit with row 1
    assert {s: [r.row for r in rs] for s, rs in result.subjects().items()} == {
        "p1": [1, 8],
        "q": [9],
    }
    assert sorted(SiteDataset(result, tiny_config.data).subject_rows) == [[0, 1], [2]]
    assert len(result.site_warnings) == 6
    assert (
        "rows 1 and 2 hold the same voxels under subject ids 'p1' and 'p2'"
        in (result.site_warnings[0])
    )
    report = result.to_json()
    assert set(report) == {
        "data_path",
        "usable",
        "subjects",
        "rejected",
        "warnings",
        "site_warnings",
    }
    assert report["subjects"] == 2


def test_merges_are_transitive(tmp_path, tiny_config):
    """a = b by one scan, b = c by another: a, b and c are one subject."""
    site = tmp_path / "site"
    for seed in (1, 2, 3):
        save_nifti(site / f"{seed}.nii.gz", scan(seed).astype(np.float32))
    (site / "copy1.nii").write_bytes(gzip.decompress((site / "1.nii.gz").read_bytes()))
    (site / "copy2.nii").write_bytes(gzip.decompress((site / "2.nii.gz").read_bytes()))
    rows = [
        {"image": "1.nii.gz", "subject": "a"},
        {"image": "copy1.nii", "subject": "b"},
        {"image": "2.nii.gz", "subject": "b", "phase": 1},
        {"image": "copy2.nii", "subject": "c", "phase": 1},
        {"image": "3.nii.gz", "subject": "c"},
    ]
    write_site(site, rows)
    result = check_site(site, tiny_config.data, show_progress=False)
    assert {s: [r.row for r in rs] for s, rs in result.subjects().items()} == {"a": [1, 3, 5]}


NFC = unicodedata.normalize("NFC", "José-001")
SPELLINGS = [
    NFC,
    unicodedata.normalize("NFD", "José-001"),
    "José\u200b-001",  # zero-width space
    "José-\uff10\uff10\uff11",  # full-width digits
    "\ufeff JOSÉ-001 ",  # byte-order mark, spaces, upper case
    "Jo\u00adsé-001",  # soft hyphen
]


def test_normalised_ids():
    assert len({normalise_id(s) for s in SPELLINGS}) == 1
    assert normalise_id("\u200b \ufeff") == ""


def test_ids_that_differ_only_in_form_are_one_subject(tmp_path, tiny_config):
    site = tmp_path / "site"
    for i in range(len(SPELLINGS) + 1):
        save_nifti(site / f"{i}.nii.gz", scan(10 + i).astype(np.float32))
    rows = [{"image": f"{i}.nii.gz", "subject": s} for i, s in enumerate(SPELLINGS)]
    rows.append({"image": f"{len(SPELLINGS)}.nii.gz", "subject": "\u200b"})
    write_site(site, rows)
    result = check_site(site, tiny_config.data, show_progress=False)
    assert {s: [r.row for r in rs] for s, rs in result.subjects().items()} == {
        NFC: [1, 2, 3, 4, 5, 6]
    }
    assert [(r.row, r.reason) for r in result.rejected] == [
        (7, "subject id '\\u200b' has no visible characters")
    ]
    assert len(result.site_warnings) == len(SPELLINGS) - 1
    assert all(f"subject ids {NFC!r} (row 1) and" in w for w in result.site_warnings)
    differences = [
        w.split("differ only in ")[1].split(" and their")[0] for w in result.site_warnings
    ]
    assert differences == [
        "Unicode composition (NFC/NFD)",
        "invisible characters",
        "compatibility characters (full-width digits, ligatures)",
        "invisible characters, surrounding whitespace and case",
        "invisible characters",
    ]


def test_colliding_ids_of_people_whose_sex_differs_are_refused(tmp_path, tiny_config):
    site = tmp_path / "site"
    for i in range(4):
        save_nifti(site / f"{i}.nii.gz", scan(20 + i).astype(np.float32))
    rows = [
        {"image": "0.nii.gz", "subject": "Anna-7", "sex": 0},
        {"image": "1.nii.gz", "subject": "ANNA-7", "sex": 1},
        {"image": "2.nii.gz", "subject": "ANNA-7", "sex": 1, "phase": 1},
        {"image": "3.nii.gz", "subject": "Anna-7", "sex": 0, "phase": 1},
    ]
    write_site(site, rows)
    result = check_site(site, tiny_config.data, show_progress=False)
    assert [r.row for r in result.records] == [1, 4]
    assert [r.row for r in result.rejected] == [2, 3]
    for rejection in result.rejected:
        assert rejection.reason.startswith(
            "subject id 'ANNA-7' is the same id as 'Anna-7' (row 1) but for case, and "
            "sex 1 (male) in row 2, 0 (female) in row 1: two people whose ids collide"
        ), rejection.reason


def test_rows_of_one_subject_must_agree_on_sex_age_and_bmi(tmp_path, tiny_config):
    site = tmp_path / "site"
    for i in range(5):
        save_nifti(site / f"{i}.nii.gz", scan(30 + i).astype(np.float32))
    rows = [
        {"image": "0.nii.gz", "subject": "s1"},  # sex 1, age 54, bmi 26.5
        {"image": "1.nii.gz", "subject": "s1", "sex": 0},
        {"image": "2.nii.gz", "subject": "s1", "age": 57},
        {"image": "3.nii.gz", "subject": "s1", "bmi": 29},
        {"image": "4.nii.gz", "subject": "s1", "age": 54.8, "bmi": 27.3, "phase": 1},
    ]
    write_site(site, rows)
    result = check_site(site, tiny_config.data, show_progress=False)
    assert [r.row for r in result.records] == [1, 3, 4, 5]
    assert [(r.row, r.reason) for r in result.rejected] == [
        (2, "sex 0 (female) here, 1 (male) in row 1 of subject 's1'")
    ]
    assert [(w.row, w.reason) for w in result.warnings] == [
        (3, "age 57 years here, 54 years in row 1 of subject 's1'"),
        (4, "bmi 29 kg/m2 here, 26.5 kg/m2 in row 1 of subject 's1'"),
    ]
    strict = check_site(site, tiny_config.data, show_progress=False, strict=True)
    assert [r.row for r in strict.records] == [1, 5]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (
            {"lvesv": 160, "lvef": 10},
            "lvesv 160 mL is above lvedv 150 mL: a ventricle holds less blood at end-systole",
        ),
        (
            {"rvesv": 170, "rvef": 10},
            "rvesv 170 mL is above rvedv 160 mL: a ventricle holds less blood at end-systole",
        ),
        (
            {"lvef": 70},
            "lvef 70 % is more than 5 points off the 60.0 that lvedv 150 mL and lvesv 60 mL "
            "give (100 x (EDV - ESV) / EDV)",
        ),
        ({"rvef": 46}, "rvef 46 % is more than 5 points off the 56.2 that rvedv 160 mL"),
        (
            {"sex": "M"},
            "attribute sex must be 0 (female) or 1 (male); found 'M'",
        ),
        ({"phase": "ES"}, "attribute phase must be 0 (ED) or 1 (ES); found 'ES'"),
        ({"sex": ""}, "attribute sex must be 0 (female) or 1 (male); found nothing"),
    ],
)
def test_contradictory_or_miscoded_attributes_are_refused(tmp_path, tiny_config, change, reason):
    site = tmp_path / "site"
    save_nifti(site / "a.nii.gz", scan(1).astype(np.float32))
    write_site(site, [{"image": "a.nii.gz", "subject": "s1", **change}])
    result = check_site(site, tiny_config.data, show_progress=False, read_images=False)
    assert not result.records
    assert reason in result.rejected[0].reason, result.rejected[0].reason


def test_physiology_is_checked_within_tolerance_and_only_for_configured_attributes(
    tmp_path, tiny_config
):
    site = tmp_path / "site"
    save_nifti(site / "a.nii.gz", scan(1).astype(np.float32))
    write_site(
        site,
        [
            {"image": "a.nii.gz", "subject": "s1", "lvef": 64.5},  # 4.5 points off 60
            {"image": "a.nii.gz", "subject": "s2", "lvef": 75},  # 15 points off 60
        ],
    )
    result = check_site(site, tiny_config.data, show_progress=False, read_images=False)
    assert [r.row for r in result.records] == [1]
    assert "lvef 75 %" in result.rejected[0].reason
    without_lvef = dataclasses.replace(
        tiny_config.data,
        attributes=tuple(a for a in tiny_config.data.attributes if a.name != "lvef"),
    )
    result = check_site(site, without_lvef, show_progress=False, read_images=False)
    assert [r.row for r in result.records] == [1]  # row 2: same file, not the EF
    assert "same image" in result.rejected[0].reason


def test_phantom_rows_pass_the_attribute_checks(phantom_root, tiny_config):
    for folder in ("public", "site-1"):
        result = check_site(phantom_root / folder, tiny_config.data, show_progress=False)
        assert result.records and not result.rejected, result.rejected
        assert not result.site_warnings


def test_a_holdout_sharing_an_id_in_another_spelling_is_refused(tmp_path, tiny_config):
    train, holdout = tmp_path / "train", tmp_path / "holdout"
    save_nifti(train / "a.nii.gz", scan(1).astype(np.float32))
    save_nifti(holdout / "b.nii.gz", scan(2).astype(np.float32))
    write_site(train, [{"image": "a.nii.gz", "subject": SPELLINGS[0]}])
    write_site(holdout, [{"image": "b.nii.gz", "subject": SPELLINGS[4]}])
    with pytest.raises(FedsynthError, match=r"shares 0 image\(s\) and 1 subject id\(s\)"):
        check_disjoint(train, holdout, tiny_config.data)
