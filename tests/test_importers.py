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
from pathlib import Path

import dataset_layouts as layouts
import nibabel as nib
import numpy as np
import pytest

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


def test_readme_import_commands_parse():
    """The commands of README's 'Data a site brings' name real layouts and options."""
    from fedsynth.common.cli import build_parser

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Data a site brings", 1)[1].split("\n## ", 1)[0]
    commands = [line.split()[1:] for line in section.splitlines() if line.startswith("fedsynth ")]
    assert sum(c[0] == "import" for c in commands) == 4 and commands[-1][0] == "site-check"
    parser = build_parser()
    for command in commands:
        parser.parse_args([part.strip('"') for part in command])
