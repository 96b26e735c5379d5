"""One person is one subject: the same scan in any storage (or float32 rounding of a
re-export) under two ids, ids that differ only in Unicode form, case, invisible characters
or leading zeros, and attributes that contradict each other within a row or a subject
(ids merged as one person included), on generated site folders."""

from __future__ import annotations

import dataclasses
import gzip
import unicodedata
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from sitefiles import GOOD_ATTRIBUTES, blob_volume, save_nifti, write_site

from fedsynth.client.audit import check_disjoint
from fedsynth.common.data import SiteDataset, check_site
from fedsynth.common.errors import FedsynthError
from fedsynth.common.scan_match import SIGNATURE_TOLERANCE, ScanIndex, oriented, probe, views
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


def test_a_holdout_holding_a_training_scan_under_another_file_and_id_is_refused(
    tmp_path, tiny_config
):
    """A holdout export that re-exported a training patient under a new pseudonym (.nii
    instead of .nii.gz) would let the audit compare the model's members with themselves:
    the train/holdout check compares voxels too, with site-check's matcher."""
    train, holdout = tmp_path / "train", tmp_path / "holdout"
    x = blob_volume((48, 40, 12), seed=0)
    save_nifti(train / "x.nii.gz", x, zooms=(2, 2, 8))
    save_nifti(holdout / "x_export.nii", x, zooms=(2, 2, 8))
    save_nifti(holdout / "y.nii.gz", blob_volume((48, 40, 12), seed=1), zooms=(2, 2, 8))
    write_site(train, [{"image": "x.nii.gz", "subject": "A"}])
    write_site(
        holdout,
        [{"image": "y.nii.gz", "subject": "H2"}, {"image": "x_export.nii", "subject": "H1"}],
    )
    with pytest.raises(
        FedsynthError,
        match=r"--holdout holds 1 training scan\(s\) under another file or subject id \(e\.g\. "
        r"its row 2 has the voxels of --data-path row 1\): held-out subjects must be ones",
    ):
        check_disjoint(train, holdout, tiny_config.data)
    write_site(holdout, [{"image": "y.nii.gz", "subject": "H2"}])
    check_disjoint(train, holdout, tiny_config.data)  # another scan: held out


def float32_re_export(root):
    """A dcm2niix-like int16 scan with scl_slope/inter and the same scan decoded in float32
    arithmetic and saved as float32 (last-bit differences in many voxels)."""
    raw = np.round(blob_volume((48, 40, 12), seed=0) * 3000).astype(np.int16)
    slope, inter = np.float32(0.1234567), np.float32(3.3)
    affine = np.diag([2.0, 2.0, 8.0, 1.0])
    stored = nib.Nifti1Image(raw, affine)
    stored.header.set_slope_inter(float(slope), float(inter))
    nib.save(stored, root / "dcm2niix.nii.gz")
    decoded = raw.astype(np.float32) * slope + inter
    nib.save(nib.Nifti1Image(decoded, affine), root / "re_export.nii.gz")
    return decoded


def test_a_re_export_decoded_in_float32_arithmetic_is_the_same_scan(tmp_path, tiny_config):
    """The same series through a tool that decodes in 32-bit floats differs from nibabel's
    float64 decode in the last bit of a third of its voxels: an exact hash made it a
    second person with the full privacy loss. It is matched to 1e-5 of the range."""
    decoded = float32_re_export(tmp_path)
    nibabel_decode = np.asanyarray(nib.load(tmp_path / "dcm2niix.nii.gz").dataobj)
    differ = np.count_nonzero(nibabel_decode.astype(np.float32) != decoded)
    assert differ > 0.1 * decoded.size  # the case is really hit: last-bit differences
    np.testing.assert_allclose(nibabel_decode, decoded, rtol=1e-6)  # and nothing more
    rows = [
        {"image": "dcm2niix.nii.gz", "subject": "MRN-7"},
        {"image": "re_export.nii.gz", "subject": "PSEUDO-31"},
    ]
    result = check_site(write_site(tmp_path, rows), tiny_config.data, show_progress=False)
    assert list(result.subjects()) == ["MRN-7"]
    assert [(r.row, r.reason) for r in result.rejected] == [
        (
            2,
            "duplicate of row 1 (same voxels); subject ids 'MRN-7' and 'PSEUDO-31' count as one "
            "subject",
        )
    ]


def test_near_identical_but_different_scans_are_not_merged(tmp_path, tiny_config):
    """Another noise draw of the same blob, and the same scan with a small dark spot inside
    the blob where no signature voxel lies (the signatures agree: only the full comparison
    tells them apart), are other scans: three subjects, no warning."""
    x = blob_volume((48, 40, 12), seed=0)
    redrawn = x + 1e-3 * np.random.default_rng(5).random(x.shape).astype(np.float32)
    spot = x.copy()
    spot[20:23, 20:23, 6] -= 0.05  # inside the blob: its minimum and maximum stay
    signatures = [probe(v, np.diag([2.0, 2.0, 8.0, 1.0])).signature for v in (x, spot)]
    assert np.abs(signatures[0] - signatures[1]).max() <= SIGNATURE_TOLERANCE  # a candidate
    for name, volume in (("x", x), ("redrawn", redrawn), ("spot", spot)):
        save_nifti(tmp_path / f"{name}.nii.gz", volume, zooms=(2, 2, 8))
    rows = [
        {"image": "x.nii.gz", "subject": "A"},
        {"image": "redrawn.nii.gz", "subject": "B"},
        {"image": "spot.nii.gz", "subject": "C"},
    ]
    result = check_site(write_site(tmp_path, rows), tiny_config.data, show_progress=False)
    assert list(result.subjects()) == ["A", "B", "C"], result.rejected
    assert not result.site_warnings


def test_scan_matching_re_reads_a_file_only_for_a_candidate():
    """A site's scans are compared by signature, all earlier ones of a shape at once; a
    file is read again only to confirm a candidate, never once per pair of rows."""
    reads = []
    volumes = {f"{i}": blob_volume((24, 20, 6), seed=i) for i in range(200)}
    affine = np.diag([4.0, 4.0, 16.0, 1.0])

    def load(path):
        reads.append(path)
        return volumes[path.name], affine

    scans = ScanIndex(load)
    for name, volume in volumes.items():
        assert scans.find(views(volume, affine)) is None
        scans.add(views(volume, affine), Path(name))
    assert not reads
    again = volumes["17"].astype(np.float64)[::-1, ::-1, :]  # stored the other way round
    flipped = affine @ np.diag([-1.0, -1.0, 1.0, 1.0])
    flipped[:2, 3] = [4.0 * 23, 4.0 * 19]
    assert scans.find(views(again, flipped)) == 17
    assert reads == [Path("17")]


def test_ids_that_differ_only_in_leading_zeros_are_one_number(tmp_path, tiny_config):
    """A spreadsheet reads 00123 as the number 123: rows added after it was re-saved name
    person 00123 as 123. All-digit ids compare as their number, so the collision rule
    applies: one subject when sex, age and BMI agree, else the later spelling refused."""
    assert normalise_id("00123") == normalise_id("123") == normalise_id("\uff10\uff11\uff12\uff13")
    assert normalise_id("000") == "0"
    assert normalise_id("P00123") != normalise_id("P123")  # only ids that are one number
    for i in range(4):
        save_nifti(tmp_path / f"{i}.nii.gz", scan(40 + i).astype(np.float32))
    rows = [
        {"image": "0.nii.gz", "subject": "00123"},
        {"image": "1.nii.gz", "subject": "123", "phase": 1},
        {"image": "2.nii.gz", "subject": "0456", "sex": 0},
        {"image": "3.nii.gz", "subject": "456", "sex": 1},
    ]
    result = check_site(write_site(tmp_path, rows), tiny_config.data, show_progress=False)
    assert {s: [r.row for r in rs] for s, rs in result.subjects().items()} == {
        "00123": [1, 2],
        "0456": [3],
    }
    assert result.site_warnings == [
        "subject ids '00123' (row 1) and '123' (row 2) differ only in leading zeros and their "
        "attributes agree: counted as one subject"
    ]
    assert [r.row for r in result.rejected] == [4]
    assert result.rejected[0].reason.startswith(
        "subject id '456' is the same id as '0456' (row 3) but for leading zeros, and sex 1 "
        "(male) in row 4, 0 (female) in row 3: two people whose ids collide"
    )


def test_ids_merged_as_one_person_must_agree_on_sex_and_are_warned_on_age(tmp_path, tiny_config):
    """Patient MRN-7 exported twice: 'A' (female, scan X), then under 'B' (male: one
    registration is wrong) with scans Y and X again. X makes A and B one subject, so rows 1
    and 2 would reach DP-SGD as one person with two sexes. The rows of merged ids are held
    to the rule for rows of one id: row 2 is refused for its sex; an age beyond the
    tolerance is warned about (refused under --strict)."""
    x = blob_volume((48, 40, 12), seed=0)
    y = blob_volume((48, 40, 12), seed=1)
    save_nifti(tmp_path / "x.nii.gz", x, zooms=(2, 2, 8))
    save_nifti(tmp_path / "y.nii.gz", y, zooms=(2, 2, 8))
    save_nifti(tmp_path / "x_again.nii", x, zooms=(2, 2, 8))
    rows = [
        {"image": "x.nii.gz", "subject": "A", "sex": 0},
        {"image": "y.nii.gz", "subject": "B", "sex": 1},
        {"image": "x_again.nii", "subject": "B", "sex": 1},
    ]
    result = check_site(write_site(tmp_path, rows), tiny_config.data, show_progress=False)
    assert [r.row for r in result.records] == [1]
    assert [(r.row, r.file, r.reason) for r in result.rejected] == [
        (
            2,
            "y.nii.gz",
            "sex 1 (male) here, 0 (female) in row 1 of subject 'A' (subject id 'B' is the same "
            "person: the ids share a scan)",
        ),
        (
            3,
            "x_again.nii",
            "duplicate of row 1 (same voxels); subject ids 'A' and 'B' count as one subject",
        ),
    ]
    assert SiteDataset(result, tiny_config.data).subject_rows == [[0]]
    rows = [{**r, "sex": 0} for r in rows]
    rows[1]["age"] = 58
    result = check_site(write_site(tmp_path, rows), tiny_config.data, show_progress=False)
    assert SiteDataset(result, tiny_config.data).subject_rows == [[0, 1]]
    assert [(w.row, w.reason) for w in result.warnings] == [
        (
            2,
            "age 58 years here, 54 years in row 1 of subject 'A' (subject id 'B' is the same "
            "person: the ids share a scan)",
        )
    ]
    strict = check_site(tmp_path, tiny_config.data, show_progress=False, strict=True)
    assert [r.row for r in strict.rejected] == [2, 3]
    assert strict.rejected[0].reason.endswith("(--strict)")


@pytest.mark.parametrize("stored_as", ["as-stored", "short-axis"])
def test_a_re_export_without_orientation_codes_is_the_same_scan(tmp_path, tiny_config, stored_as):
    """A tool that drops the orientation codes (qform and sform code 0: ANALYZE-style
    writers, some anonymisers) keeps the stored voxels (or stores them in the short-axis
    order) but the header no longer says how they lie: the copy under another id must still
    be the same scan, so one person, not two (each scan is matched as stored too)."""
    site = tmp_path / "site"
    site.mkdir()
    data = (blob_volume((24, 20, 6), seed=7) * 1000).astype(np.float32)
    lps = np.diag([-4.0, -4.0, 16.0, 1.0])  # as dcm2niix writes a DICOM series
    lps[:3, 3] = [4.0 * 23, 4.0 * 19, 0.0]
    nib.save(nib.Nifti1Image(data, lps), site / "scan.nii.gz")
    voxels = data if stored_as == "as-stored" else oriented(data, lps)
    assert not np.array_equal(oriented(data, lps), data)  # the header's order is another
    copy = nib.Nifti1Image(np.ascontiguousarray(voxels), None)
    copy.header.set_zooms((4.0, 4.0, 16.0))
    copy.header.set_qform(None, code=0)
    copy.header.set_sform(None, code=0)
    nib.save(copy, site / "export.nii.gz")
    assert not np.array_equal(oriented(*nib_read(site / "export.nii.gz")), oriented(data, lps))
    write_site(
        site,
        [{"image": "scan.nii.gz", "subject": "p1"}, {"image": "export.nii.gz", "subject": "x9"}],
    )
    result = check_site(site, tiny_config.data, show_progress=False)
    assert [r.row for r in result.rejected] == [2]
    assert "duplicate of row 1 (same voxels)" in result.rejected[0].reason
    assert len({r.subject for r in result.records}) == 1


def nib_read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI file's voxels and the affine nibabel gives them."""
    image = nib.load(path)
    return np.asarray(image.dataobj), image.affine


def mnms_numbered_label() -> np.ndarray:
    """A 24x20x6 label map whose myocardium (2) encloses label 1: M&Ms numbering."""
    labels = np.zeros((24, 20, 6), np.float32)
    labels[6:18, 5:15, 1:5] = 2
    labels[9:15, 8:12, 1:5] = 1
    labels[6:18, 15:19, 1:5] = 3
    return labels


@pytest.mark.parametrize("refused_by", ["label", "attribute"])
def test_a_row_refused_before_its_scan_is_matched_still_links_its_ids(
    tmp_path, tiny_config, refused_by
):
    """A row refused for its label map or an attribute typo is still one person's scan:
    its voxels are read (bounded, as any row) so that the same scan under another id makes
    the ids one subject, with a site warning. Row 1 patient "a" ED (refused), row 2 the
    same scan under "b", row 3 patient "a" ES."""
    site = tmp_path / "site"
    ed = (blob_volume(seed=31) * 1000).astype(np.float32)
    save_nifti(site / "a_ed.nii.gz", ed)
    save_nifti(site / "export.nii", ed)  # the same scan, another file, another id
    save_nifti(site / "a_es.nii.gz", (blob_volume(seed=32) * 1000).astype(np.float32))
    first = {"image": "a_ed.nii.gz", "subject": "a", "phase": 0, "label": ""}
    if refused_by == "label":
        save_nifti(site / "a_ed_gt.nii.gz", mnms_numbered_label())
        first["label"] = "a_ed_gt.nii.gz"
    else:
        first["age"] = "5O"
    rows = [
        first,
        {"image": "export.nii", "subject": "b", "phase": 0, "label": ""},
        {"image": "a_es.nii.gz", "subject": "a", "phase": 1, "label": ""},
    ]
    write_site(site, rows, columns=["image", "label", "subject", *GOOD_ATTRIBUTES])
    result = check_site(site, tiny_config.data, show_progress=False)
    assert [r.row for r in result.rejected] == [1], [r.reason for r in result.rejected]
    assert ("label" if refused_by == "label" else "age") in result.rejected[0].reason
    assert len({r.subject for r in result.records}) == 1
    assert any("rows 1 and 2 hold the same voxels" in w for w in result.site_warnings)


def test_a_row_refused_for_its_image_is_not_read_again(tmp_path, tiny_config, monkeypatch):
    """Linking a refused row's scan costs no second read of an image refused as unreadable
    or no image, and one bounded read of a row refused before its image was read."""
    import fedsynth.common.data as data

    site = tmp_path / "site"
    save_nifti(site / "flat.nii.gz", np.ones((24, 20, 6), np.float32))  # a constant image
    save_nifti(site / "typo.nii.gz", (blob_volume(seed=33) * 1000).astype(np.float32))
    rows = [
        {"image": "flat.nii.gz", "subject": "a", "phase": 0},
        {"image": "typo.nii.gz", "subject": "b", "phase": 0, "age": "5O"},
    ]
    write_site(site, rows, columns=["image", "subject", *GOOD_ATTRIBUTES])
    reads: list[str] = []
    real = data._read  # every read of a volume's voxels, read_nifti and read_image alike

    def counted(path, max_voxels):
        reads.append(path.name)
        return real(path, max_voxels)

    monkeypatch.setattr(data, "_read", counted)
    result = check_site(site, tiny_config.data, show_progress=False)
    assert [r.row for r in result.rejected] == [1, 2]
    assert reads == ["flat.nii.gz", "typo.nii.gz"]


@pytest.mark.parametrize("invisible", ["\u034f", "\ufe0f", "\u3164", "\uffa0", "\U000e0101"])
def test_ids_differing_only_in_a_default_ignorable_character_are_one_subject(
    tmp_path, tiny_config, invisible
):
    """Beyond category Cf, the other default-ignorable code points print as nothing too:
    the combining grapheme joiner (Mn), variation selectors (Mn; phones insert U+FE0F),
    the Hangul fillers (Lo). Ids differing in one are one subject, with a warning."""
    assert unicodedata.category(invisible) != "Cf"
    site = tmp_path / "site"
    for name, seed in (("ed", 21), ("es", 22)):
        save_nifti(site / f"{name}.nii.gz", (blob_volume(seed=seed) * 1000).astype(np.float32))
    write_site(
        site,
        [
            {"image": "ed.nii.gz", "subject": "P001", "phase": 0},
            {"image": "es.nii.gz", "subject": f"P{invisible}001", "phase": 1},
        ],
    )
    result = check_site(site, tiny_config.data, show_progress=False)
    assert len(result.records) == 2, [r.reason for r in result.rejected]
    assert len({r.subject for r in result.records}) == 1
    assert any("invisible characters" in w and "counted as one" in w for w in result.site_warnings)


def test_two_patients_with_a_spike_in_the_same_voxel_are_two_scans(tmp_path, tiny_config):
    """The match tolerance is a fraction of the robust (0.5-99.5 percentile) range: a 1e30
    scanner spike at the same voxel of two patients' scans does not make the tolerance 1e25
    and the two people one subject; both rows are usable (each with the outlier warning)."""
    site = tmp_path / "site"
    for i, name in enumerate(("a", "b")):
        data = (blob_volume((24, 20, 6), seed=10 + i) * 1000).astype(np.float32)
        data[0, 0, 0] = 1e30
        save_nifti(site / f"{name}.nii.gz", data)
    write_site(site, [{"image": "a.nii.gz", "subject": "a"}, {"image": "b.nii.gz", "subject": "b"}])
    result = check_site(site, tiny_config.data, show_progress=False)
    assert [r.reason for r in result.rejected] == []
    assert sorted(r.subject for r in result.records) == ["a", "b"]
    assert not any("one person" in w for w in result.site_warnings)
    assert [w.row for w in result.warnings] == [1, 2]


def test_one_spiked_scan_in_another_storage_is_still_one_scan(tmp_path):
    """The other direction: the same spiked scan re-exported with float32 rounding (its
    spike rounded too) is found again."""
    data = (blob_volume((24, 20, 6), seed=3) * 1000).astype(np.float32)
    data[0, 0, 0] = 1e30
    copy = (data.astype(np.float64) * (1 + 3e-8)).astype(np.float32)
    affine = np.diag([4.0, 4.0, 16.0, 1.0])
    path = save_nifti(tmp_path / "a.nii.gz", data)
    index = ScanIndex(lambda p: (np.asarray(nib.load(p).dataobj), nib.load(p).affine))
    index.add(views(data, affine), path)
    assert index.find(views(copy, affine)) == 0


def test_a_held_out_patient_with_the_training_scans_spike_is_not_a_training_scan(
    tmp_path, tiny_config
):
    """The train/holdout check uses the same matcher: another patient's scan with a 1e30
    spike in the voxel where a training scan has one is held out, not a training scan."""
    train, holdout = tmp_path / "train", tmp_path / "holdout"
    for folder, seed in ((train, 20), (holdout, 21)):
        data = (blob_volume((24, 20, 6), seed=seed) * 1000).astype(np.float32)
        data[0, 0, 0] = 1e30
        save_nifti(folder / "scan.nii.gz", data)
    write_site(train, [{"image": "scan.nii.gz", "subject": "A"}])
    write_site(holdout, [{"image": "scan.nii.gz", "subject": "H"}])
    check_disjoint(train, holdout, tiny_config.data)
