"""`fedsynth import` on generated trees in each dataset's own layout (tests/dataset_layouts.py):
the frames it picks, the orientation it keeps, the attributes it measures against the
generator's truth, the site folder it writes (site-check accepts every row, 0600/0700),
and what it refuses or skips, each in one line."""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import os
import stat
import subprocess
import sys
import unicodedata
from pathlib import Path

import dataset_layouts as layouts
import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import apply_orientation, inv_ornt_aff
from sitefiles import GOOD_ATTRIBUTES

from fedsynth.common.cli import main
from fedsynth.common.config import load_config
from fedsynth.common.data import check_site
from fedsynth.common.orientation import to_short_axis

VOLUMES = ("lvedv", "lvesv", "rvedv", "rvesv", "lv_mass")


def run_import(*args: str) -> tuple[int, str, str]:
    """`fedsynth import ARGS` in process: exit status, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["import", *args])
    return code, out.getvalue(), err.getvalue()


def build(layout: str, root: Path) -> tuple[list[layouts.Truth], list[str]]:
    """A source tree of 3 subjects in `layout` and the import options it needs."""
    truths = getattr(layouts, f"write_{layout}")(root / "source")
    if layout == "acdc":  # ACDC has height and weight, not age or sex
        return truths, ["--records", str(layouts.records(root / "records.csv", truths))]
    if layout == "ukbb":  # nothing but images and segmentations
        path = layouts.records(root / "records.csv", truths, sex_as="01", body=True)
        return truths, ["--records", str(path)]
    if layout == "cine":  # its labels are numbered as M&Ms'
        return truths, ["--label-values", "1,2,3"]
    return truths, []


def manifest(site: Path) -> list[dict]:
    with (site / "manifest.csv").open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module", params=["acdc", "mnms", "ukbb", "cine"])
def imported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    truths, options = build(request.param, root)
    out = root / "site"
    code, stdout, stderr = run_import(
        "--layout", request.param, "--source", str(root / "source"), "--out", str(out), *options
    )
    return request.param, out, {t.subject: t for t in truths}, code, stdout + stderr


def test_frames_orientation_and_attributes_match_the_truth(imported):
    layout, out, truths, code, output = imported
    assert code == 0, output
    rows = manifest(out)
    assert sorted((r["subject"], r["phase"]) for r in rows) == sorted(
        (s, p) for s in truths for p in ("0", "1")
    )
    for row in rows:
        truth, phase = truths[row["subject"]], int(row["phase"])
        image = nib.load(out / row["image"])
        data, _ = to_short_axis(np.asarray(image.dataobj), image.affine)
        # the frame at the layout's ED/ES index, in the geometry it was stored in
        np.testing.assert_array_equal(data, truth.image(phase), err_msg=f"{layout} {row}")
        label = nib.load(out / row["label"])
        labels, _ = to_short_axis(np.asarray(label.dataobj), label.affine)
        np.testing.assert_array_equal(labels, truth.label(phase))  # fedsynth's numbering
        want = truth.phantom.attributes
        for name in VOLUMES:
            assert float(row[name]) == pytest.approx(want[name], rel=0.03), (layout, name)
        for name in ("lvef", "rvef"):
            assert float(row[name]) == pytest.approx(want[name], abs=3), (layout, name)
        for name in ("wall_ed", "wall_es"):
            assert float(row[name]) == pytest.approx(want[name], abs=1.0), (layout, name)
        assert row["bmi"] == f"{truth.bmi:.1f}"
        assert (float(row["age"]), int(row["sex"])) == (truth.age, truth.sex)


def test_site_check_accepts_every_row_and_no_label_map_is_an_image(imported):
    _, out, truths, _, _ = imported
    result = check_site(out, load_config("default").data, show_progress=False)
    assert result.rejected == [] and len(result.records) == 2 * len(truths), result.rejected
    assert len(result.subjects()) == len(truths)
    for row in manifest(out):
        assert row["image"].startswith("images/") and row["label"].startswith("labels/")
        image = np.asarray(nib.load(out / row["image"]).dataobj)
        assert len(np.unique(image)) > 1000  # an MR image, not a handful of label values


def test_the_site_folder_is_private(imported):
    _, out, _, _, _ = imported
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for folder, dirs, files in os.walk(out):
        for name in dirs:
            assert stat.S_IMODE((Path(folder) / name).stat().st_mode) == 0o700, name
        for name in files:
            assert stat.S_IMODE((Path(folder) / name).stat().st_mode) == 0o600, name
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_acdc_without_records_refuses_naming_age_and_sex(tmp_path):
    layouts.write_acdc(tmp_path / "source", count=1)
    out = tmp_path / "site"
    code, _, stderr = run_import(
        "--layout", "acdc", "--source", str(tmp_path / "source"), "--out", str(out)
    )
    assert code == 1 and "Traceback" not in stderr
    assert stderr.count("\n") == 1 and "age, sex" in stderr and "--records" in stderr
    assert not out.exists()


DAMAGES = [
    "missing ES frame",
    "corrupt 4D file",
    "frame out of range",
    "ED frame not labelled",
    "folder not in the CSV",
    "not in --records",
]


@pytest.mark.parametrize("damage", DAMAGES)
def test_one_subject_that_cannot_be_imported_is_skipped_the_others_are_not(tmp_path, damage):
    source = tmp_path / "source"
    if damage == "missing ES frame":
        truths = layouts.write_acdc(source)
        bad = truths[1]
        (source / "training" / bad.subject / f"{bad.subject}_frame{bad.es + 1:02d}.nii.gz").unlink()
        options = [
            "--layout",
            "acdc",
            "--records",
            str(layouts.records(tmp_path / "r.csv", truths)),
        ]
        reason = f"{bad.subject}_frame{bad.es + 1:02d}.nii.gz: file not found"
    elif damage == "not in --records":
        truths = layouts.write_acdc(source)
        bad = truths[1]
        records = layouts.records(tmp_path / "r.csv", [truths[0], truths[2]])
        options = ["--layout", "acdc", "--records", str(records)]
        reason = "no age in the dataset or --records"
    elif damage == "corrupt 4D file":
        truths = layouts.write_mnms(source)
        bad = truths[1]
        path = source / "Training" / "Labeled" / bad.subject / f"{bad.subject}_sa.nii.gz"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        options = ["--layout", "mnms"]
        reason = f"{bad.subject}_sa.nii.gz: truncated or corrupt file"
    elif damage in ("ED frame not labelled", "folder not in the CSV"):
        truths = layouts.write_mnms(source)
        bad = truths[1]
        (table,) = source.glob("*.csv")
        rows = list(csv.DictReader(table.open()))
        if damage == "ED frame not labelled":  # M&Ms labels only ED and ES
            rows[1]["ED"] = "1"
            reason = "the ED label map has no LV blood pool"
        else:
            del rows[1]
            reason = f"its folder is not in {table.name}"
        layouts.write_csv(table, rows)
        options = ["--layout", "mnms"]
    else:
        truths = layouts.write_cine(source)
        bad = truths[1]
        rows = list(csv.DictReader((source / "cine.csv").open()))
        rows[1]["es_frame1"] = str(layouts.FRAMES + 1)
        layouts.write_csv(source / "cine.csv", rows)
        options = ["--layout", "cine", "--label-values", "1,2,3"]
        reason = f"es_frame1 {layouts.FRAMES + 1} is out of range 1-{layouts.FRAMES}"
    out = tmp_path / "site"
    code, stdout, stderr = run_import("--source", str(source), "--out", str(out), *options)
    assert code == 2 and "Traceback" not in stderr
    skipped = [line for line in stdout.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 1 and skipped[0].startswith(f"skipped {bad.subject}: ")
    assert reason in skipped[0]
    assert "2 subjects imported" in stdout and "1 skipped" in stdout
    assert {r["subject"] for r in manifest(out)} == {t.subject for t in truths} - {bad.subject}


def test_a_value_outside_the_configs_range_skips_the_subject(tmp_path):
    truths = layouts.write_acdc(tmp_path / "source", count=2)
    truths[0].age = 12  # ACDC has paediatric patients; the default config starts at 18
    records = layouts.records(tmp_path / "r.csv", truths)
    code, stdout, _ = run_import(
        "--layout", "acdc", "--source", str(tmp_path / "source"), "--out",
        str(tmp_path / "site"), "--records", str(records),
    )  # fmt: skip
    assert code == 2
    assert f"skipped {truths[0].subject}: attribute age = 12 is outside [18, 95] years" in stdout


def test_reads_stay_within_data_max_voxels(tmp_path):
    layouts.write_ukbb(tmp_path / "source", count=1)
    truths_records = layouts.records(
        tmp_path / "r.csv", layouts.phantoms(1, 2, ["1000001"], [4]), body=True
    )
    code, stdout, stderr = run_import(
        "--layout", "ukbb", "--source", str(tmp_path / "source"), "--out", str(tmp_path / "site"),
        "--records", str(truths_records), "-c", "data.max-voxels=1000",
    )  # fmt: skip
    assert code == 1 and "Traceback" not in stderr
    assert "skipped 1000001: sa.nii.gz: a frame of" in stdout
    assert "more voxels than data.max-voxels 1000" in stdout


def test_a_4d_file_holding_more_than_its_header_declares_is_refused(tmp_path):
    """A gzip stream that inflates past the size its header declares (a bomb) is counted,
    never held, and its subject skipped."""
    truths = layouts.write_ukbb(tmp_path / "source", count=2)
    path = tmp_path / "source" / truths[0].subject / "sa.nii.gz"
    with gzip.open(path, "rb") as f:
        raw = f.read()
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(raw)
        for _ in range(64):
            f.write(bytes(1 << 20))  # 64 MiB of zeros past the declared voxels
    records = layouts.records(tmp_path / "r.csv", truths, body=True)
    code, stdout, _ = run_import(
        "--layout", "ukbb", "--source", str(tmp_path / "source"), "--out",
        str(tmp_path / "site"), "--records", str(records),
    )  # fmt: skip
    assert code == 2
    assert (
        f"skipped {truths[0].subject}: sa.nii.gz: decompresses to more than the" in stdout
        and "bytes its header declares" in stdout
    )


def test_out_must_be_new_empty_or_a_previous_import(tmp_path):
    truths = layouts.write_mnms(tmp_path / "source", count=1)
    out = tmp_path / "site"
    out.mkdir()
    (out / "notes.txt").write_text("the hospital's own file")
    args = ["--layout", "mnms", "--source", str(tmp_path / "source"), "--out", str(out)]
    code, _, stderr = run_import(*args)
    assert code == 1 and "is not a previous import" in stderr
    assert (out / "notes.txt").read_text() == "the hospital's own file"
    (out / "notes.txt").unlink()
    assert run_import(*args)[0] == 0  # empty
    assert run_import(*args)[0] == 0  # a previous import: replaced
    assert [r["subject"] for r in manifest(out)] == [truths[0].subject] * 2


def test_cine_frame_columns_say_their_base(tmp_path):
    truths = layouts.write_cine(tmp_path / "source", count=2)
    listing = tmp_path / "source" / "cine.csv"
    rows = list(csv.DictReader(listing.open()))
    base0 = [
        {**{k: v for k, v in r.items() if not k.endswith("frame1")},
         "ed_frame0": int(r["ed_frame1"]) - 1, "es_frame0": int(r["es_frame1"]) - 1}
        for r in rows
    ]  # fmt: skip
    layouts.write_csv(listing, base0)
    out = tmp_path / "site"
    args = ["--layout", "cine", "--source", str(listing), "--label-values", "1,2,3"]
    assert run_import(*args, "--out", str(out))[0] == 0
    for row in manifest(out):
        image = nib.load(out / row["image"])
        data, _ = to_short_axis(np.asarray(image.dataobj), image.affine)
        truth = next(t for t in truths if t.subject == row["subject"])
        np.testing.assert_array_equal(data, truth.image(int(row["phase"])))
    layouts.write_csv(listing, [{**r, "ed_frame1": 1, "es_frame1": 2} for r in base0])
    code, _, stderr = run_import(*args, "--out", str(tmp_path / "other"))
    assert code == 1 and "exactly one pair of columns" in stderr and "Traceback" not in stderr


def sform_only(path: Path, slice_zoom_factor: float) -> None:
    """Rewrite a 3D or 4D NIfTI file with its affine as sform only (qform code 0, legal
    NIfTI-1) and pixdim's slice spacing `slice_zoom_factor` times the sform's: what a
    converter that writes the slice thickness (not the spacing between slices, which
    includes the gap) into pixdim leaves. Readers that follow the standard (nibabel's
    affine, site-check) take the geometry from the sform."""
    image = nib.load(path)
    data, affine = np.asarray(image.dataobj), image.affine
    out = nib.Nifti1Image(data, affine)
    out.set_qform(None, code=0)
    out.set_sform(affine, code=1)
    zooms = list(image.header.get_zooms())
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    zooms[:3] = spacing
    zooms[int(np.argmax(spacing))] *= slice_zoom_factor
    out.header.set_zooms(tuple(float(z) for z in zooms))
    nib.save(out, path)


@pytest.mark.parametrize("layout", ["acdc", "mnms"])
def test_volumes_are_measured_in_the_affine_site_check_uses_not_pixdim(tmp_path, layout):
    """A tree whose files (3D for ACDC, 4D for M&Ms) carry their geometry in the sform with
    pixdim's slice spacing at 80% of the sform's (thickness without the gap) gives the
    same LVEDV, LVESV, RV volumes and LV mass as the tree with consistent headers: they
    are measured in the affine site-check and the model grid use, not from pixdim (which
    read every volume 20% low, inside the config's ranges, without a word)."""
    values = {}
    for name in ("plain", "sform"):
        _, options = build(layout, tmp_path / name)
        if name == "sform":
            for path in (tmp_path / name / "source").rglob("*.nii.gz"):
                sform_only(path, 0.8)
        site = tmp_path / name / "site"
        code, out, err = run_import(
            "--layout", layout, "--source", str(tmp_path / name / "source"), "--out", str(site),
            *options,
        )  # fmt: skip
        assert code == 0, out + err
        values[name] = manifest(site)
    for plain, sform in zip(values["plain"], values["sform"], strict=True):
        for column in VOLUMES:
            # the same values up to the manifest's 0.1 rounding
            assert abs(float(sform[column]) - float(plain[column])) <= 0.11, (column, plain, sform)


def no_orientation(path: Path) -> None:
    """Rewrite a NIfTI file without qform or sform (codes 0), pixdim kept: the voxel size
    is known, the orientation is not (nibabel falls back to the bare voxel grid)."""
    image = nib.load(path)
    out = nib.Nifti1Image(np.asarray(image.dataobj), None)
    out.header.set_zooms(image.header.get_zooms())
    out.set_qform(None, code=0)
    out.set_sform(None, code=0)
    nib.save(out, path)


def disagreeing_qform(path: Path) -> None:
    """Rewrite a NIfTI file with its qform 5 mm off its sform, both coded: nibabel and
    site-check use the sform; which one the scanner meant is a doubt site-check warns of."""
    image = nib.load(path)
    affine = image.affine
    moved = affine.copy()
    moved[:3, 3] += 5.0
    out = nib.Nifti1Image(np.asarray(image.dataobj), affine)
    out.set_sform(affine, code=1)
    out.set_qform(moved, code=1)
    nib.save(out, path)


ORIENTATION_DOUBTS = {
    "no codes": (no_orientation, "no qform or sform code"),
    "qform and sform disagree": (disagreeing_qform, "qform and sform disagree"),
}


@pytest.mark.parametrize(
    ("layout", "doubt"),
    [("acdc", "no codes"), ("mnms", "no codes"), ("acdc", "qform and sform disagree")],
)
def test_a_doubtful_orientation_of_the_source_survives_the_import(tmp_path, layout, doubt):
    """Files whose orientation site-check doubts (no qform or sform code: taken from the bare
    voxel grid; a qform and sform that disagree) are imported with the doubt named per
    subject and file, and written with the source's stored geometry, so that site-check of
    the imported folder warns about each row as it does about the source (they were
    written as scanner coordinates, qform and sform code 1, and the warning was lost)."""
    rewrite, said = ORIENTATION_DOUBTS[doubt]
    truths, options = build(layout, tmp_path)
    for path in (tmp_path / "source").rglob("*.nii.gz"):
        rewrite(path)
    out = tmp_path / "site"
    code, stdout, stderr = run_import(
        "--layout", layout, "--source", str(tmp_path / "source"), "--out", str(out), *options
    )
    assert code == 0, stdout + stderr
    warned = [line for line in stdout.splitlines() if line.startswith("warning ")]
    for truth in truths:
        assert any(
            line.startswith(f"warning {truth.subject}: ") and said in line for line in warned
        )
    site = check_site(out, load_config("default").data, show_progress=False)
    assert site.rejected == [], site.rejected
    for number in range(1, 2 * len(truths) + 1):
        assert any(w.row == number and said in w.reason for w in site.warnings), (number, site)


def reorder(path: Path, ornt: list[list[int]]) -> None:
    """Rewrite a 3D or 4D NIfTI file with its voxel axes permuted and reversed by `ornt`
    (nibabel orientation: target axis, flip) and the affine adjusted: the same voxels at
    the same physical places in another storage order (what a contouring tool that writes
    its own orientation leaves)."""
    image = nib.load(path)
    data, order = np.asarray(image.dataobj), np.array(ornt)
    affine = image.affine @ inv_ornt_aff(order, data.shape[:3])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(apply_orientation(data, order)), affine), path)


SEGMENTATIONS = {"acdc": "*_gt.nii.gz", "cine": "SAX_cine_seg.nii.gz"}
REORDERINGS = {
    "in-plane axes reversed": [[0, -1], [1, -1], [2, 1]],
    "rows and columns swapped": [[1, 1], [0, 1], [2, 1]],
}


@pytest.mark.parametrize("reordering", REORDERINGS)
@pytest.mark.parametrize("layout", ["acdc", "cine"])
def test_a_label_map_stored_in_another_voxel_order_is_used(tmp_path, layout, reordering):
    """A segmentation (3D for ACDC, 4D for a cine) saved in another voxel order than its
    image, every label at the same physical place, is imported with the same measured
    values as the tree stored alike and written on its image's voxel grid: label maps are
    compared with their images by voxel centres in mm (site-check takes such a pair), not
    by raw affines (every such subject was skipped)."""
    values = {}
    for name in ("alike", "reordered"):
        _, options = build(layout, tmp_path / name)
        if name == "reordered":
            for path in (tmp_path / name / "source").rglob(SEGMENTATIONS[layout]):
                reorder(path, REORDERINGS[reordering])
        site = tmp_path / name / "site"
        code, out, err = run_import(
            "--layout", layout, "--source", str(tmp_path / name / "source"), "--out", str(site),
            *options,
        )  # fmt: skip
        assert code == 0, out + err
        values[name] = manifest(site)
        for row in values[name]:
            image, label = nib.load(site / row["image"]), nib.load(site / row["label"])
            assert image.shape == label.shape
            np.testing.assert_allclose(label.affine, image.affine, atol=1e-4)
    for alike, reordered in zip(values["alike"], values["reordered"], strict=True):
        for column in (*VOLUMES, "wall_ed", "wall_es"):
            assert reordered[column] == alike[column], (column, alike, reordered)


@pytest.mark.parametrize("damage", ["shifted", "no orientation codes"])
def test_a_label_map_on_another_grid_is_skipped_saying_so(tmp_path, damage):
    """A segmentation whose voxel centres are not its image's (shifted by a third of a
    slice; or without qform and sform codes beside an image that has them, so its place is
    unknown) cannot be reordered onto it: the subject is skipped naming the phase and, for
    the missing codes, the file without them."""
    truths, options = build("acdc", tmp_path)
    bad = truths[0]
    for path in (tmp_path / "source" / "training" / bad.subject).glob("*_gt.nii.gz"):
        if damage == "shifted":
            image = nib.load(path)
            affine = image.affine.copy()
            affine[:3, 3] += affine[:3, 2] / 3
            nib.save(nib.Nifti1Image(np.asarray(image.dataobj), affine), path)
        else:
            no_orientation(path)
    code, stdout, _ = run_import(
        "--layout", "acdc", "--source", str(tmp_path / "source"), "--out",
        str(tmp_path / "site"), *options,
    )  # fmt: skip
    assert code == 2
    assert f"skipped {bad.subject}: the ED label map's voxels are not its image's" in stdout
    assert (": the label map has no qform or sform code" in stdout) == (damage != "shifted")


def extra_field(path: Path, row: int, field: str) -> None:
    """Append `,field` to data row `row` (1-based) of a CSV file: one field more than its
    header, as an unquoted decimal comma or a comma in a path leaves."""
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    lines[row] += f",{field}"
    path.write_text("\n".join(lines) + "\n")


RAGGED = ["records: decimal comma", "records: short row", "cine.csv", "M&Ms CSV"]


@pytest.mark.parametrize("case", RAGGED)
def test_a_csv_row_with_another_number_of_fields_is_one_line(tmp_path, case):
    """A row of --records, cine.csv or the M&Ms information CSV with more or fewer fields
    than its header (an unquoted decimal comma "72,5", a comma in a value, a missing cell)
    refuses the import in one line naming the file, the row and, for a decimal comma, the
    column: csv.DictReader puts extra fields under None and the import died with
    AttributeError ('list' object has no attribute 'strip'), or skipped the subject with
    "could not be read (AttributeError ...)"."""
    source = tmp_path / "source"
    if case.startswith("records"):
        truths = layouts.write_acdc(source, count=1)
        table = tmp_path / "records.csv"
        fields = "54,M,72,5" if case == "records: decimal comma" else "54"
        table.write_text(f"subject,age,sex,weight\n{truths[0].subject},{fields}\n")
        options = ["--layout", "acdc", "--records", str(table)]
        said = "in column weight (72,5)" if case == "records: decimal comma" else "no sex, weight"
    elif case == "cine.csv":
        layouts.write_cine(source, count=2)
        table = source / "cine.csv"
        extra_field(table, 1, "5")
        options = ["--layout", "cine", "--label-values", "1,2,3"]
        said = "an unquoted comma inside a value"
    else:
        layouts.write_mnms(source, count=2)
        (table,) = source.glob("*.csv")
        extra_field(table, 1, "5")
        options = ["--layout", "mnms"]
        said = "an unquoted comma inside a value"
    code, stdout, stderr = run_import(
        "--source", str(source), "--out", str(tmp_path / "site"), *options
    )
    assert code == 1 and "Traceback" not in stderr and "AttributeError" not in stdout + stderr
    assert stderr.count("\n") == 1, stderr
    assert f"{table.name}: row 1 has " in stderr and "fields" in stderr and said in stderr, stderr
    assert not (tmp_path / "site").exists()


def test_a_quoted_decimal_comma_skips_the_subject_saying_so(tmp_path):
    """A value written "54,5" (quoted: one field) is refused, not guessed ("1,250"), and the
    skip says to write it with a decimal point."""
    truths = layouts.write_acdc(tmp_path / "source", count=2)
    path = layouts.records(tmp_path / "records.csv", truths)
    rows = list(csv.DictReader(path.open(newline="")))
    rows[0]["age"] = "54,5"
    layouts.write_csv(path, rows)
    code, stdout, _ = run_import(
        "--layout", "acdc", "--source", str(tmp_path / "source"), "--out",
        str(tmp_path / "site"), "--records", str(path),
    )  # fmt: skip
    assert code == 2
    assert f"skipped {truths[0].subject}: age '54,5' is not a number (a decimal comma?" in stdout


@pytest.mark.parametrize("layout", ["cine", "acdc"])
def test_labels_in_another_numbering_say_what_was_found(tmp_path, layout):
    """Segmentations numbered as M&Ms / UK Biobank (1 LV, 2 myocardium, 3 RV) read with
    another numbering (a cine without --label-values, default 3,2,1; an ACDC tree whose
    _gt files were written by another tool) skip each subject saying which label the
    myocardium encloses and, for the cine layout, the --label-values to give (it said
    'no slice where the LV myocardium surrounds the LV blood pool', which reads as a
    broken segmentation)."""
    source = tmp_path / "source"
    if layout == "cine":
        layouts.write_cine(source, count=1)
    else:
        truths = layouts.write_acdc(source, count=1)
        for path in source.rglob("*_gt.nii.gz"):
            image = nib.load(path)
            relabelled = layouts.relabel(np.asarray(image.dataobj), {1: 3, 2: 2, 3: 1})
            nib.save(nib.Nifti1Image(relabelled, image.affine, image.header), path)
    options = (
        ["--records", str(layouts.records(tmp_path / "r.csv", truths))] if layout == "acdc" else []
    )
    code, stdout, stderr = run_import(
        "--layout", layout, "--source", str(source), "--out", str(tmp_path / "site"), *options
    )
    assert code == 1 and "Traceback" not in stderr
    assert "label value 1 lies inside value 2" in stdout
    assert "numbered LV 1, myocardium 2, not as read (LV 3, myocardium 2, RV 1)" in stdout
    assert ("give --label-values 1,2,3" in stdout) == (layout == "cine"), stdout


SPELLINGS = {
    "case": str.capitalize,
    "zero-width space": lambda s: s[:3] + "\u200b" + s[3:],
    "full-width digits": lambda s: s.translate({ord(d): ord(d) + 0xFEE0 for d in "0123456789"}),
    "decomposed accent (NFD)": lambda s: unicodedata.normalize("NFD", s + "é"),
}


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_records_keyed_in_another_spelling_are_found(tmp_path, spelling):
    """A --records CSV that spells the dataset's ids otherwise (its own spreadsheet's
    'Patient001', an invisible character, full-width digits, another Unicode form) is
    matched as site-check compares ids (subject_identity.normalise_id); every subject was
    skipped with 'no age in the dataset or --records'."""
    truths = layouts.write_acdc(tmp_path / "source", count=1)
    if spelling.startswith("decomposed"):  # the dataset's id composed, the records' not
        folder = tmp_path / "source" / "training" / truths[0].subject
        name = unicodedata.normalize("NFC", truths[0].subject + "é")
        for path in folder.iterdir():
            path.rename(folder / path.name.replace(truths[0].subject, name))
        folder.rename(folder.with_name(name))
    path = layouts.records(tmp_path / "records.csv", truths)
    rows = list(csv.DictReader(path.open(newline="")))
    for row in rows:
        row["subject"] = SPELLINGS[spelling](row["subject"])
    layouts.write_csv(path, rows)
    code, stdout, stderr = run_import(
        "--layout", "acdc", "--source", str(tmp_path / "source"), "--out",
        str(tmp_path / "site"), "--records", str(path),
    )  # fmt: skip
    assert code == 0, stdout + stderr
    (row, _) = manifest(tmp_path / "site")
    assert (float(row["age"]), int(row["sex"])) == (truths[0].age, truths[0].sex)


def test_records_of_no_source_subject_are_named(tmp_path):
    """A --records row whose id is no subject of the source (a typo, a subject not in this
    download) is named in one warning; the import goes on. It was ignored without a word."""
    truths = layouts.write_acdc(tmp_path / "source", count=1)
    path = layouts.records(tmp_path / "records.csv", truths)
    rows = list(csv.DictReader(path.open(newline="")))
    layouts.write_csv(path, [*rows, {**rows[0], "subject": "patient0O1"}])
    code, stdout, stderr = run_import(
        "--layout", "acdc", "--source", str(tmp_path / "source"), "--out",
        str(tmp_path / "site"), "--records", str(path),
    )  # fmt: skip
    assert code == 0, stdout + stderr
    assert "warning: --records lists 1 subject(s) not in --source (patient0o1)" in stdout


def test_records_whose_ids_collide_after_normalisation_are_refused(tmp_path):
    """Two --records rows whose ids differ only in case are one id to site-check: which
    row holds the subject's values cannot be known, so the file is refused naming both."""
    truths = layouts.write_acdc(tmp_path / "source", count=1)
    path = layouts.records(tmp_path / "records.csv", truths)
    rows = list(csv.DictReader(path.open(newline="")))
    layouts.write_csv(path, [*rows, {**rows[0], "subject": rows[0]["subject"].upper()}])
    code, _, stderr = run_import(
        "--layout", "acdc", "--source", str(tmp_path / "source"), "--out",
        str(tmp_path / "site"), "--records", str(path),
    )  # fmt: skip
    assert code == 1 and stderr.count("\n") == 1
    assert "'PATIENT001' in row 2 is already in row 1 (as 'patient001', but for case)" in stderr


def test_dataset_ids_that_collide_after_normalisation_import_one_subject(tmp_path):
    """Two cine.csv rows whose ids differ only in case (two people to the source, one id to
    site-check): the later is skipped saying whose id it is."""
    layouts.write_cine(tmp_path / "source", count=2)
    listing = tmp_path / "source" / "cine.csv"
    rows = list(csv.DictReader(listing.open(newline="")))
    rows[1]["subject"] = rows[0]["subject"].upper()
    layouts.write_csv(listing, rows)
    code, stdout, _ = run_import(
        "--layout", "cine", "--source", str(listing), "--out", str(tmp_path / "site"),
        "--label-values", "1,2,3",
    )  # fmt: skip
    assert code == 2
    assert (
        f"skipped {rows[1]['subject']}: its id is '{rows[0]['subject']}''s but for case" in stdout
    )


@pytest.mark.parametrize("text_file", ["Info.cfg", "records.csv"])
def test_text_files_saved_with_a_byte_order_mark_are_read(tmp_path, text_file):
    """Info.cfg or --records opened and saved in Windows Notepad (UTF-8 with a byte-order
    mark, CRLF line ends) read as without: Info.cfg's first key was read as '\\ufeffed', so
    ED was missing and every subject skipped ("Info.cfg ED None is not a frame number")."""
    truths = layouts.write_acdc(tmp_path / "source", count=1)
    records = layouts.records(tmp_path / "records.csv", truths)
    for path in [*(tmp_path / "source").rglob(text_file), *tmp_path.glob(text_file)]:
        text = path.read_text()
        path.write_bytes(
            b"\xef\xbb\xbf" + text.replace("\r\n", "\n").replace("\n", "\r\n").encode()
        )
    code, stdout, stderr = run_import(
        "--layout", "acdc", "--source", str(tmp_path / "source"), "--out",
        str(tmp_path / "site"), "--records", str(records),
    )  # fmt: skip
    assert code == 0, stdout + stderr
    for row in manifest(tmp_path / "site"):  # the ED and ES frames Info.cfg names
        image = nib.load(tmp_path / "site" / row["image"])
        data, _ = to_short_axis(np.asarray(image.dataobj), image.affine)
        np.testing.assert_array_equal(data, truths[0].image(int(row["phase"])))


def test_documented_import_commands_parse():
    """The commands of docs/site-data.md's `fedsynth import` section name real layouts and
    options."""
    from fedsynth.common.cli import build_parser

    page = (Path(__file__).resolve().parents[1] / "docs" / "site-data.md").read_text()
    section = page.split("\n## From a dataset or a scanner export:", 1)[1].split("\n## ", 1)[0]
    commands = [line.split()[1:] for line in section.splitlines() if line.startswith("fedsynth ")]
    assert sum(c[0] == "import" for c in commands) == 4 and commands[-1][0] == "site-check"
    parser = build_parser()
    for command in commands:
        parser.parse_args([part.strip('"') for part in command])


def a_gone_pid() -> str:
    """The id of a process that has exited."""
    return subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True).stdout.strip()  # fmt: skip


@pytest.mark.parametrize("name", ["site", "site[2024]", "cohort*"])
def test_a_killed_imports_staging_folder_is_removed_by_the_next(tmp_path, name):
    """An import killed before it finished leaves its private staging folder (a copy of
    patient scans) beside --out; the next import into that --out removes it, whatever
    glob characters --out's name holds. One whose process still runs (here: this one) is
    left alone."""
    gone = a_gone_pid()
    stale = tmp_path / f".{name}.importing-{gone}-0a1b2c3d"
    running = tmp_path / f".{name}.importing-{os.getpid()}-0a1b2c3d"
    for folder in (stale, running):
        folder.mkdir()
        (folder / "scan.nii.gz").write_bytes(b"x")
    _, options = build("mnms", tmp_path)
    code, stdout, stderr = run_import(
        "--layout", "mnms", "--source", str(tmp_path / "source"), "--out", str(tmp_path / name),
        *options,
    )  # fmt: skip
    assert code == 0, stdout + stderr
    assert not stale.exists() and running.exists()
    assert (tmp_path / name / "manifest.csv").is_file()


KILLED_AT = """
import os, shutil, signal, sys
def killed_at(module, name, when):
    real = getattr(module, name)
    def call(*args, **kwargs):
        if when(*args):
            os.kill(os.getpid(), signal.SIGKILL)  # the import killed right here
        return real(*args, **kwargs)
    setattr(module, name, call)
if sys.argv[1] == "removing":  # removing the previous import it has set aside
    killed_at(shutil, "rmtree", lambda path, *_: ".replaced-" in os.fspath(path))
else:  # between setting the previous import aside and moving the new one in
    killed_at(os, "replace", lambda src, dst: ".importing-" in os.path.basename(src))
from fedsynth.common.cli import main
sys.exit(main(["import", *sys.argv[2:]]))
"""


def killed_import(where: str, args: list[str]) -> None:
    """`fedsynth import ARGS` in a process killed (SIGKILL) at `where` in replacing --out."""
    killed = subprocess.run([sys.executable, "-c", KILLED_AT, where, *args], env=os.environ)
    assert killed.returncode == -9, "the kill did not happen where the test means it to"


def test_a_previous_import_left_aside_by_a_killed_replace_is_removed_by_the_next(tmp_path):
    """An import killed while it removes the previous import it replaces leaves that
    import's scans in a hidden folder beside --out; the next import removes it."""
    _, options = build("mnms", tmp_path)
    args = ["--layout", "mnms", "--source", str(tmp_path / "source"),
            "--out", str(tmp_path / "site"), *options]  # fmt: skip
    assert run_import(*args)[0] == 0
    killed_import("removing", args)
    assert list(tmp_path.glob(".site.replaced-*"))
    code, stdout, stderr = run_import(*args)
    assert code == 0, stdout + stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".site.")] == []


def test_a_site_folder_moved_aside_by_a_killed_replace_is_restored(tmp_path):
    """An import killed after it moved the previous import aside, before it moved the new
    one in, leaves no --out: the next import moves the previous one back, so an import
    that then writes nothing (every subject skipped) still leaves the site folder."""
    _, options = build("mnms", tmp_path)
    args = ["--layout", "mnms", "--source", str(tmp_path / "source"),
            "--out", str(tmp_path / "site"), *options]  # fmt: skip
    assert run_import(*args)[0] == 0
    before = manifest(tmp_path / "site")
    killed_import("moving", args)
    assert not (tmp_path / "site").exists()
    code, stdout, _ = run_import(*args, "-c", "data.max-voxels=1000")  # every subject skipped
    assert code == 1 and stdout.count("skipped ") == 3
    assert manifest(tmp_path / "site") == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".site.")] == []


@pytest.mark.parametrize("layout", ["acdc", "mnms", "cine", "cine without labels"])
def test_ed_and_es_on_one_frame_skip_the_subject_saying_so(tmp_path, layout):
    """ED and ES given as one frame would import two rows of the same voxels (site-check
    then refuses the ES row as a duplicate): the subject is skipped naming the frame."""
    source = tmp_path / "source"
    truths, options = build(layout.split()[0], tmp_path)
    bad = truths[1]
    if layout == "acdc":
        info = source / "training" / bad.subject / "Info.cfg"
        info.write_text(info.read_text().replace(f"ES: {bad.es + 1}\n", f"ES: {bad.ed + 1}\n"))
        frame = bad.ed + 1
    else:
        (listing,) = source.glob("*.csv")
        rows = list(csv.DictReader(listing.open()))
        ed, es = ("ED", "ES") if layout == "mnms" else ("ed_frame1", "es_frame1")
        rows[1][es] = rows[1][ed]
        if layout == "cine without labels":  # the attributes from the listing, not measured
            rows = [{**r, **GOOD_ATTRIBUTES} for r in rows]
            for row in rows:
                del row["label"]
            options = []
        layouts.write_csv(listing, rows)
        frame = int(rows[1][ed])
    out = tmp_path / "site"
    code, stdout, stderr = run_import(
        "--layout", layout.split()[0], "--source", str(source), "--out", str(out), *options
    )
    assert code == 2 and "Traceback" not in stderr
    skipped = [line for line in stdout.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 1 and skipped[0].startswith(f"skipped {bad.subject}: ")
    assert f"ED and ES are the same frame {frame} (" in skipped[0]
    result = check_site(out, load_config("default").data, show_progress=False)
    assert result.rejected == [] and len(result.subjects()) == len(truths) - 1
