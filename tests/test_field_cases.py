"""Kinds of real-world input that once broke site-check (issue 12 item 13), generated here
with nibabel: each bad file is one row's rejection with a one-line reason, never a
traceback that stops the check of the other rows."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from sitefiles import blob_volume, write_site

from fedsynth.common import data
from fedsynth.common.data import check_site, read_nifti

OBLIQUE = np.array([[-2.0, 0, 0, 90], [0, 0, 8, -40], [0, -2, 0, 100], [0, 0, 0, 1]])


def save_with_codes(path, sform=None, sform_code=0, qform=None, qform_code=0):
    """A blob volume whose header carries exactly the given qform/sform and codes (with no
    image affine, nibabel writes the header's own)."""
    image = nib.Nifti1Image(blob_volume(seed=sum(map(ord, path.name))), None)
    image.header.set_sform(np.diag([2.0, 2.0, 8.0, 1.0]) if sform is None else sform, sform_code)
    image.header.set_qform(np.diag([2.0, 2.0, 8.0, 1.0]) if qform is None else qform, qform_code)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path


def qform_sform_site(root):
    """One row per kind of qform/sform header; returns {image: reason or None if usable}."""
    save_with_codes(root / "q_ne_s.nii.gz", sform=OBLIQUE, sform_code=1, qform_code=1)
    save_with_codes(root / "qonly.nii.gz", qform=OBLIQUE, qform_code=1)
    save_with_codes(root / "nocodes.nii.gz")
    save_with_codes(root / "singular_sform.nii.gz", sform=np.diag([0.0, 0, 0, 1]), sform_code=1,
                    qform_code=1)  # fmt: skip
    nan = OBLIQUE.copy()
    nan[0, 0] = np.nan
    save_with_codes(root / "nan_sform.nii.gz", sform=nan, sform_code=2)
    flat = OBLIQUE.copy()
    flat[:3, 2] = flat[:3, 0]  # third axis parallel to the first: a plane, not a volume
    save_with_codes(root / "flat_sform.nii.gz", sform=flat, sform_code=1)
    expected = {
        "q_ne_s.nii.gz": None,
        "qonly.nii.gz": None,
        "nocodes.nii.gz": None,
        "singular_sform.nii.gz": "sform is coded but singular: no valid orientation",
        "nan_sform.nii.gz": "sform is coded but not finite: no valid orientation",
        "flat_sform.nii.gz": "sform is coded but singular: no valid orientation",
    }
    write_site(root, [{"image": name, "subject": f"s{i}"} for i, name in enumerate(expected)])
    return expected


def test_qform_sform_each_kind_is_used_or_refused_with_its_reason(tmp_path, tiny_config):
    expected = qform_sform_site(tmp_path / "site")
    result = check_site(tmp_path / "site", tiny_config.data, show_progress=False)
    usable = {r.image.name for r in result.records}
    assert usable == {name for name, reason in expected.items() if reason is None}
    assert {r.file: r.reason for r in result.rejected} == {
        name: reason for name, reason in expected.items() if reason is not None
    }
    assert result.warnings == [
        "row 1 (q_ne_s.nii.gz): qform and sform disagree; the sform is used (as nibabel does)",
        "row 3 (nocodes.nii.gz): no qform or sform code: orientation taken from the voxel grid",
    ]
    # the affine used is the one nibabel picks: the sform when both are coded
    np.testing.assert_allclose(read_nifti(tmp_path / "site" / "q_ne_s.nii.gz")[1], OBLIQUE)
    np.testing.assert_allclose(read_nifti(tmp_path / "site" / "qonly.nii.gz")[1], OBLIQUE)


def test_an_unexpected_error_in_one_file_is_that_rows_rejection(tmp_path, tiny_config, monkeypatch):
    """Whatever a reader or transform raises (MONAI wraps errors in RuntimeError) rejects
    that row only; an interrupt still stops the check."""
    site = tmp_path / "site"
    for i in range(3):
        save_with_codes(site / f"{i}.nii.gz", sform_code=1)
    write_site(site, [{"image": f"{i}.nii.gz", "subject": f"s{i}"} for i in range(3)])
    real = data.load_volume

    def flaky(path, transform):
        if path.name == "1.nii.gz":
            try:
                raise ValueError(f"bad affine in {path}\nsecond line")
            except ValueError as exc:
                raise RuntimeError("applying transform <Orientation object at 0x7f>") from exc
        return real(path, transform)

    monkeypatch.setattr(data, "load_volume", flaky)
    result = check_site(site, tiny_config.data, show_progress=False)
    assert [r.row for r in result.records] == [1, 3]
    assert [(r.row, r.reason) for r in result.rejected] == [
        (2, "could not be read (ValueError: bad affine in 1.nii.gz)")
    ]

    def interrupted(path, transform):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "load_volume", interrupted)
    with pytest.raises(KeyboardInterrupt):
        check_site(site, tiny_config.data, show_progress=False)


def site_check_cli(site):
    return subprocess.run(
        [sys.executable, "-m", "fedsynth.common.cli", "site-check", "--data-path", str(site),
         "--config", "default", "--json"],
        capture_output=True, text=True,
    )  # fmt: skip


def test_site_check_cli_finishes_a_site_with_bad_headers_without_traceback(tmp_path):
    expected = qform_sform_site(tmp_path / "site")
    proc = site_check_cli(tmp_path / "site")
    assert "Traceback" not in proc.stderr and proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["usable"] == sum(reason is None for reason in expected.values())
    assert len(report["rejected"]) == sum(reason is not None for reason in expected.values())
