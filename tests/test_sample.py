"""Sampling a cohort from a tiny checkpoint: files, values, manifest, refusals, determinism."""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fedsynth.common.checkpoint import Pretrained, load_pretrained
from fedsynth.common.cli import main
from fedsynth.common.data import check_site, scale_attributes
from fedsynth.common.diffusion import sample_latents, sampling_scheduler
from fedsynth.common.errors import FedsynthError
from fedsynth.common.models import latent_shape
from fedsynth.common.orientation import short_axis_affine
from fedsynth.common.sampling import draw_public_attributes, read_attributes_csv, sample_cohort


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors run faster on one thread, and do not stall when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint, one_thread) -> Path:
    return tiny_checkpoint


@pytest.fixture(scope="module")
def pretrained(checkpoint) -> Pretrained:
    return load_pretrained(checkpoint)


def rows_for(pretrained: Pretrained, n: int) -> list[dict[str, float]]:
    """n distinct, valid attribute rows spread over each declared range, each ESV the one
    its EDV and EF give (a possible heart, as site-check requires of a cohort read back)."""
    rows = []
    for i in range(n):
        fraction = (i + 1) / (n + 1)
        row = {
            a.name: round(a.min + fraction * (a.max - a.min), 0 if a.discrete else 3)
            for a in pretrained.config.data.attributes
        }
        for edv, esv, ef in (("lvedv", "lvesv", "lvef"), ("rvedv", "rvesv", "rvef")):
            row[esv] = round(row[edv] * (1 - row[ef] / 100), 3)
        rows.append(row)
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def sample(pretrained: Pretrained, out: Path, n: int = 1, **kwargs) -> list[np.ndarray]:
    settings = dict(guidance_scale=3.0, steps=3, scheduler="ddim", seed=0, batch_size=2)
    settings |= kwargs
    rows = settings.pop("rows", None) or rows_for(pretrained, n)
    paths = sample_cohort(pretrained, n, rows, out, show_progress=False, **settings)
    return [nib.load(p).get_fdata(dtype=np.float32) for p in paths]


def test_cohort_files_values_and_manifest(tmp_path, pretrained):
    config = pretrained.config
    rows = rows_for(pretrained, 4)
    rows[0]["lvedv"] = 123.4567  # not representable with 6 digits: must still round-trip
    rows[0]["lvesv"] = round(123.4567 * (1 - rows[0]["lvef"] / 100), 3)
    requested = read_attributes_csv(write_csv(tmp_path / "attrs.csv", rows), config, 3)
    paths = sample_cohort(
        pretrained, 3, requested, tmp_path / "out", 3.0, 3, "ddim", 0, 2, show_progress=False
    )  # batches of 2 and 1
    cohort = tmp_path / "out" / "cohort"
    assert [p.name for p in paths] == ["syn-0001.nii.gz", "syn-0002.nii.gz", "syn-0003.nii.gz"]
    for path in paths:
        image = nib.load(path)
        data = np.asanyarray(image.dataobj)
        assert data.shape == config.data.shape and data.dtype == np.float32
        assert np.isfinite(data).all() and data.min() >= 0 and data.max() <= 1 and data.std() > 0
        assert image.header.get_zooms() == pytest.approx(config.data.spacing)
        assert np.allclose(image.affine, short_axis_affine(config.data.spacing, data.shape))
        assert image.header.get_xyzt_units()[0] == "mm"
    with (cohort / "manifest.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        manifest = list(reader)
    names = [a.name for a in config.data.attributes]
    assert reader.fieldnames == ["image", "subject", *names, "synthetic"]
    assert {r["synthetic"] for r in manifest} == {"yes"}
    assert [r["image"] for r in manifest] == [p.name for p in paths]
    assert len({r["subject"] for r in manifest}) == 3
    assert [{n: float(r[n]) for n in names} for r in manifest] == requested
    assert manifest[0]["lvedv"] == "123.4567"
    # the cohort reads back as a site: every volume usable, attributes as requested
    site = check_site(cohort, config.data, show_progress=False)
    assert len(site.records) == 3 and not site.rejected
    assert (tmp_path / "out" / "montage.png").stat().st_size > 10_000
    provenance = json.loads((tmp_path / "out" / "sampling.json").read_text())
    # a checkpoint not beside the output is named by a stand-in, not its folders
    assert provenance["checkpoint"] == f"CHECKPOINTS/{Path(pretrained.folder).name}"
    assert provenance["n"] == 3
    with pytest.raises(FedsynthError, match="already holds a cohort"):
        sample(pretrained, tmp_path / "out")


def test_attributes_csv_is_checked_row_by_row(tmp_path, pretrained):
    config = pretrained.config
    rows = rows_for(pretrained, 3)
    assert read_attributes_csv(write_csv(tmp_path / "ok.csv", rows), config, 2) == rows[:2]
    with pytest.raises(FedsynthError, match=r"has 3 rows; 4 subjects"):
        read_attributes_csv(tmp_path / "ok.csv", config, 4)
    bad = [dict(r) for r in rows]
    bad[1]["lvedv"] = 9999
    with pytest.raises(FedsynthError, match=r"bad\.csv row 2: attribute lvedv = 9999 is outside"):
        read_attributes_csv(write_csv(tmp_path / "bad.csv", bad), config, 3)
    bad[1]["lvedv"], bad[2]["age"] = rows[1]["lvedv"], "old"
    with pytest.raises(FedsynthError, match=r"row 3: attribute age = 'old' is not a number"):
        read_attributes_csv(write_csv(tmp_path / "bad.csv", bad), config, 3)
    swapped = [dict(r) for r in rows]  # a heart that cannot exist, as site-check refuses it
    swapped[0]["lvedv"], swapped[0]["lvesv"] = rows[0]["lvesv"], rows[0]["lvedv"]
    with pytest.raises(FedsynthError, match=r"row 1: lvesv .* is above lvedv"):
        read_attributes_csv(write_csv(tmp_path / "swapped.csv", swapped), config, 3)
    without = [{k: v for k, v in r.items() if k != "bmi"} for r in rows]
    with pytest.raises(FedsynthError, match="lacks required column"):
        read_attributes_csv(write_csv(tmp_path / "cols.csv", without), config, 1)


def test_public_attributes_drawn_by_seed(checkpoint, pretrained):
    config = pretrained.config
    table = read_attributes_csv(checkpoint / "public_attributes.csv", config, 8)
    first = draw_public_attributes(checkpoint, config, 6, seed=0)
    assert first == draw_public_attributes(checkpoint, config, 6, seed=0)
    assert first != draw_public_attributes(checkpoint, config, 6, seed=1)
    assert all(row in table for row in first)


def test_same_seed_same_cohort_other_seed_other_cohort(tmp_path, pretrained):
    first = sample(pretrained, tmp_path / "a", n=2, seed=7)
    again = sample(pretrained, tmp_path / "b", n=2, seed=7)
    other = sample(pretrained, tmp_path / "c", n=2, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(first, again, strict=True))
    assert all(np.abs(x - y).mean() > 1e-3 for x, y in zip(first, other, strict=True))


def test_ddpm_runs_the_full_chain(tmp_path, pretrained):
    calls = []
    hook = pretrained.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        ddim = sample(pretrained, tmp_path / "ddim", scheduler="ddim", steps=3)
        assert len(calls) == 3
        ddpm = sample(pretrained, tmp_path / "ddpm", scheduler="ddpm")
        assert len(calls) == 3 + pretrained.config.diffusion.train_timesteps
    finally:
        hook.remove()
    assert np.isfinite(ddpm[0]).all() and np.abs(ddpm[0] - ddim[0]).mean() > 1e-3


def awake(pretrained: Pretrained) -> Pretrained:
    """The real UNet with MONAI's zero-initialised output layers given random weights.

    Five pretraining steps leave those layers near zero, so conditional and null
    predictions would differ by ~1e-7; waking them makes guidance visible without a fake.
    """
    unet = copy.deepcopy(pretrained.unet)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in unet.parameters():
            if param.dim() > 1 and param.abs().max() < 1e-2:
                param.normal_(std=0.05)
    return dataclasses.replace(pretrained, unet=unet)


def test_guidance_zero_ignores_attributes_and_guidance_uses_them(pretrained):
    """On latents (decoding a 5-step autoencoder clips most of the difference away)."""
    model = awake(pretrained)
    config = model.config
    chain = sampling_scheduler(config.diffusion, "ddim", 3)
    low, high = (
        torch.from_numpy(scale_attributes(r, config.data.attributes))[None]
        for r in rows_for(pretrained, 2)
    )

    def latents(attributes: torch.Tensor, guidance: float) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        shape = latent_shape(config)
        return sample_latents(model.unet, chain, attributes, shape, guidance, generator)

    # unguided: exactly the same whatever was asked; guided: what was asked matters
    assert torch.equal(latents(low, 0.0), latents(high, 0.0))
    assert (latents(low, 3.0) - latents(high, 3.0)).abs().max() > 1e-4
    assert (latents(low, 3.0) - latents(low, 0.0)).abs().max() > 1e-4


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n": 0}, "--n must be at least 1"),
        ({"steps": 0}, "--steps must be at least 1"),
        ({"steps": 13}, "exceeds the 12 training timesteps"),
        ({"guidance_scale": -1.0}, "--guidance-scale must be >= 0"),
        ({"scheduler": "euler"}, "--scheduler must be one of ddim, ddpm"),
        ({"batch_size": 0}, "--batch-size must be at least 1"),
        ({"n": 2}, "1 attribute rows for 2 subjects"),
    ],
)
def test_bad_arguments_are_refused(tmp_path, pretrained, change, message):
    rows = rows_for(pretrained, 1)
    with pytest.raises(FedsynthError, match=message):
        sample(pretrained, tmp_path, rows=rows, **change)
    assert not (tmp_path / "cohort").exists()


def test_cli_samples_with_checkpoint_defaults(tmp_path, checkpoint, capsys):
    out = tmp_path / "cli"
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(checkpoint),
                "--n",
                "2",
                "--out",
                str(out),
                "--quiet",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    line = capsys.readouterr().out.strip()
    assert "s per volume; LV cavity requested vs measured r=" in line
    assert "ddim, guidance 3" in line
    assert len(list((out / "cohort").glob("syn-*.nii.gz"))) == 2
    assert (out / "montage.png").is_file()
    # the anatomy meter's report: requested cavity = EDV for ED rows, ESV for ES rows
    report = json.loads((out / "controllability.json").read_text())
    with (out / "cohort" / "manifest.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    expected = [float(r["lvesv"] if r["phase"] == "1" else r["lvedv"]) for r in rows]
    assert report["lv"]["requested_ml"] == pytest.approx(expected, abs=0.05)
    assert len(report["rv"]["measured_ml"]) == report["lv"]["n"] == 2
    assert report["guidance_scale"] == 3.0


def test_cli_missing_checkpoint_is_one_line_and_exit_1(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedsynth.common.cli",
            "sample",
            "--checkpoint",
            str(tmp_path / "nope"),
            "--n",
            "1",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"fedsynth sample: error: checkpoint {tmp_path / 'nope'} is not a folder"
    ]
