"""Kinds of real-world input that once broke site-check (issue 12 item 13), generated here
with nibabel: each bad file is one row's rejection with a one-line reason, never a
traceback that stops the check of the other rows."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import tracemalloc

import nibabel as nib
import numpy as np
import pytest
from sitefiles import blob_volume, save_nifti, write_site

from fedsynth.common import data
from fedsynth.common.config import ConfigError, load_config
from fedsynth.common.data import check_site, read_nifti

# blob_volume()'s 24x20x6 voxels at 4 x 4 x 16 mm: a stack the size of a heart's scan
PLAIN = np.diag([4.0, 4.0, 16.0, 1.0])
OBLIQUE = np.array([[-4.0, 0, 0, 90], [0, 0, 16, -40], [0, -4, 0, 100], [0, 0, 0, 1]])


def save_with_codes(path, sform=None, sform_code=0, qform=None, qform_code=0):
    """A blob volume whose header carries exactly the given qform/sform and codes (with no
    image affine, nibabel writes the header's own)."""
    image = nib.Nifti1Image(blob_volume(seed=sum(map(ord, path.name))), None)
    image.header.set_sform(PLAIN if sform is None else sform, sform_code)
    image.header.set_qform(PLAIN if qform is None else qform, qform_code)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path


def qform_sform_site(root):
    """One row per kind of qform/sform header; returns {image: reason or None if usable}."""
    save_with_codes(root / "q_ne_s.nii.gz", sform=OBLIQUE, sform_code=1, qform_code=1)
    save_with_codes(root / "qonly.nii.gz", qform=OBLIQUE, qform_code=1)
    save_with_codes(root / "nocodes.nii.gz")
    save_with_codes(
        root / "singular_sform.nii.gz", sform=np.diag([0.0, 0, 0, 1]), sform_code=1, qform_code=1
    )
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
    assert [(w.row, w.file, w.reason) for w in result.warnings] == [
        (1, "q_ne_s.nii.gz", "qform and sform disagree; the sform is used (as nibabel does)"),
        (3, "nocodes.nii.gz", "no qform or sform code: orientation taken from the voxel grid"),
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
    real = data.read_image

    def flaky(path, *limits):
        if path.name == "1.nii.gz":
            try:
                raise ValueError(f"bad affine in {path}\nsecond line")
            except ValueError as exc:
                raise RuntimeError("applying transform <Orientation object at 0x7f>") from exc
        return real(path, *limits)

    monkeypatch.setattr(data, "read_image", flaky)
    result = check_site(site, tiny_config.data, show_progress=False)
    assert [r.row for r in result.records] == [1, 3]
    assert [(r.row, r.reason) for r in result.rejected] == [
        (2, "could not be read (ValueError: bad affine in 1.nii.gz)")
    ]

    def interrupted(path, *limits):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "read_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        check_site(site, tiny_config.data, show_progress=False)


def site_check_cli(site):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "fedsynth.common.cli",
            "site-check",
            "--data-path",
            str(site),
            "--config",
            "default",
            "--json",
        ],
        capture_output=True,
        text=True,
    )


@pytest.mark.slow  # a CLI subprocess (10 s on 2 shared cores); the in-process tests cover it
def test_site_check_cli_finishes_a_site_with_bad_headers_without_traceback(tmp_path):
    expected = qform_sform_site(tmp_path / "site")
    proc = site_check_cli(tmp_path / "site")
    assert "Traceback" not in proc.stderr and proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["usable"] == sum(reason is None for reason in expected.values())
    assert len(report["rejected"]) == sum(reason is not None for reason in expected.values())


def claim_dims(path, dims):
    """Rewrite a saved .nii/.nii.gz header so that it claims `dims`; the voxels stay."""
    raw = path.read_bytes()
    gz = path.name.endswith(".gz")
    header = bytearray(gzip.decompress(raw) if gz else raw)
    header[40:56] = np.array([len(dims), *dims, *[1] * (7 - len(dims))], "<i2").tobytes()
    path.write_bytes(gzip.compress(bytes(header)) if gz else bytes(header))
    return path


def huge_dims_site(root):
    """One row per kind of header that claims what the file does not hold."""
    for name, dims in [
        ("huge.nii.gz", (32767, 32767, 32767)),
        ("huge.nii", (32767, 32767, 32767)),
        ("negative.nii.gz", (-1, 20, 6)),
        ("half_gb.nii.gz", (1024, 1024, 128)),  # 512 MiB of float32 claimed, 11 KiB held
        ("half_gb.nii", (1024, 1024, 128)),
        ("control.nii.gz", (24, 20, 6)),
    ]:
        save_nifti(root / name, blob_volume(seed=len(name)))
        claim_dims(root / name, dims)
    held = "the file holds 11520)"
    expected = {
        "huge.nii.gz": f"truncated or corrupt file (the header claims 32767x32767x32767 "
        f"voxels, {4 * 32767**3} bytes; {held}",
        "huge.nii": f"truncated or corrupt file (the header claims 32767x32767x32767 "
        f"voxels, {4 * 32767**3} bytes; {held}",
        "negative.nii.gz": "invalid size in the header (-1x20x6)",
        "half_gb.nii.gz": f"truncated or corrupt file (the header claims 1024x1024x128 voxels, "
        f"{2**29} bytes; {held}",
        "half_gb.nii": f"truncated or corrupt file (the header claims 1024x1024x128 voxels, "
        f"{2**29} bytes; {held}",
        "control.nii.gz": None,
    }
    write_site(root, [{"image": name, "subject": f"s{i}"} for i, name in enumerate(expected)])
    return expected


def test_a_header_claiming_more_than_the_file_holds_is_refused_unread(tmp_path, tiny_config):
    """Nothing of the claimed size is allocated: peak Python/numpy memory stays far below
    the 512 MiB one header claims."""
    expected = huge_dims_site(tmp_path / "site")
    tracemalloc.start()
    try:
        result = check_site(tmp_path / "site", tiny_config.data, show_progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20
    assert [r.image.name for r in result.records] == ["control.nii.gz"]
    assert {r.file: r.reason for r in result.rejected} == {
        name: reason for name, reason in expected.items() if reason is not None
    }


@pytest.mark.parametrize("name", ["big.nii", "big.nii.gz"])
def test_a_volume_above_data_max_voxels_is_refused_before_it_is_read(tmp_path, name):
    config = load_config("tiny", {"data.max-voxels": 24 * 20 * 6 - 1})
    site = tmp_path / "site"
    save_nifti(site / name, blob_volume((24, 20, 6)))
    save_nifti(site / "small.nii.gz", blob_volume((24, 20, 5)))
    write_site(site, [{"image": name, "subject": "s1"}, {"image": "small.nii.gz", "subject": "s2"}])
    result = check_site(site, config.data, show_progress=False)
    assert [r.image.name for r in result.records] == ["small.nii.gz"]
    assert [r.reason for r in result.rejected] == [
        "implausible size 24x20x6 (2880 voxels, above data.max-voxels 2879)"
    ]
    # the reader used in training is bounded by the file alone, not by the site's limit
    assert read_nifti(site / name)[0].shape == (24, 20, 6)


def test_data_max_voxels_must_be_positive():
    assert load_config("default").data.max_voxels >= 96 * 96 * 13  # the paper's volumes
    with pytest.raises(ConfigError, match=r"data\.max-voxels = 0: must be > 0"):
        load_config("tiny", {"data.max-voxels": 0})
