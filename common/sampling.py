"""Synthetic cohorts from a pretrained checkpoint: DDIM (or DDPM) with classifier-free guidance.

Attributes come per subject from a CSV, checked cell by cell as a site manifest is, or are
drawn from the public attribute table the checkpoint carries (public data: no DP claim).
Volumes are written first and `manifest.csv` last, so a cohort folder with a manifest is
complete; the manifest has a site manifest's columns (and `synthetic` = yes on every row,
so a file that travels alone still says what it is), so a cohort can be read back as a
site. `sampling.json` beside the cohort names the checkpoint and settings it came from.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from fedsynth.common.anatomy import VolumeMeter, agreement, meter_path
from fedsynth.common.attribute_checks import check_physiology
from fedsynth.common.checkpoint import PUBLIC_ATTRIBUTES, Pretrained, load_torch
from fedsynth.common.config import Config
from fedsynth.common.data import MANIFEST, parse_attribute, read_table, scale_attributes
from fedsynth.common.diffusion import sample_latents, sampling_scheduler
from fedsynth.common.errors import FedsynthError
from fedsynth.common.io import PUBLIC_MODE, atomic_path, atomic_write_text, published_path
from fedsynth.common.models import latent_shape
from fedsynth.common.orientation import short_axis_affine
from fedsynth.common.progress import progress

COHORT = "cohort"
MONTAGE = "montage.png"
SAMPLING_JSON = "sampling.json"  # beside cohort/: the checkpoint and settings it came from
SCHEDULERS = ("ddim", "ddpm")


def _read_csv(path: Path, config: Config) -> list[dict[str, str]]:
    """Rows of a CSV that has every configured attribute as a column."""
    return read_table(path, [a.name for a in config.data.attributes])[1]


def _parse_rows(path: Path, rows: list[dict[str, str]], config: Config) -> list[dict[str, float]]:
    """Each row checked against the declared ranges and for a heart that can exist
    (attribute_checks.check_physiology, as site-check checks a site's rows: a cohort asked
    for ESV above EDV would be refused by any site that read it); the first bad one is
    refused by number."""
    parsed = []
    attributes = config.data.attributes
    for number, row in enumerate(rows, start=1):
        try:
            values = {a.name: parse_attribute(row[a.name], a) for a in attributes}
            check_physiology(values, attributes)
            parsed.append(values)
        except ValueError as exc:
            raise FedsynthError(f"attributes {path} row {number}: {exc}") from None
    return parsed


def read_attributes_csv(path: str | Path, config: Config, n: int) -> list[dict[str, float]]:
    """The first `n` rows of a per-subject attributes CSV (row numbers exclude the header)."""
    path = Path(path).expanduser()
    rows = _read_csv(path, config)
    if len(rows) < n:
        raise FedsynthError(f"attributes {path} has {len(rows)} rows; {n} subjects were asked for")
    return _parse_rows(path, rows[:n], config)


def draw_public_attributes(
    checkpoint: str | Path, config: Config, n: int, seed: int
) -> list[dict[str, float]]:
    """`n` rows drawn with replacement from the checkpoint's public attribute table."""
    path = Path(checkpoint).expanduser() / PUBLIC_ATTRIBUTES
    table = _parse_rows(path, _read_csv(path, config), config)
    if not table:
        raise FedsynthError(f"attributes {path} has no rows to draw from")
    picks = np.random.default_rng(seed).integers(0, len(table), size=n)
    return [table[i] for i in picks]


def _nifti(volume: np.ndarray, spacing: tuple[float, float, float]) -> nib.Nifti1Image:
    """A float32 image whose affine and header zooms carry the config's spacing in mm; the
    affine is the short-axis frame's, so the reader gives the volume back as generated."""
    affine = short_axis_affine(spacing, volume.shape)
    image = nib.Nifti1Image(volume.astype(np.float32), affine)
    image.header.set_xyzt_units("mm", "sec")
    return image


def _cell(value: float) -> str:
    """A number as written in the manifest: short, yet read back as the same float."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def check_arguments(n: int, steps: int, guidance_scale: float, scheduler: str, batch: int) -> None:
    """Refuse arguments that cannot give a cohort, each with a one-line reason."""
    if n < 1:
        raise FedsynthError(f"--n must be at least 1 (got {n})")
    if steps < 1:
        raise FedsynthError(f"--steps must be at least 1 (got {steps})")
    if not guidance_scale >= 0:
        raise FedsynthError(f"--guidance-scale must be >= 0 (got {guidance_scale:g})")
    if scheduler not in SCHEDULERS:
        raise FedsynthError(f"--scheduler must be one of {', '.join(SCHEDULERS)} (got {scheduler})")
    if batch < 1:
        raise FedsynthError(f"--batch-size must be at least 1 (got {batch})")


def sample_cohort(
    pretrained: Pretrained,
    n: int,
    attributes_rows: list[dict[str, float]],
    out: str | Path,
    guidance_scale: float,
    steps: int,
    scheduler: str,
    seed: int,
    batch_size: int,
    show_progress: bool = True,
) -> list[Path]:
    """Generate `n` volumes on the networks' device into out/cohort; return their paths.

    One generator seeded once drives every batch, so a seed (with the same batch size and
    device) gives the same cohort. DDPM always runs the full training chain; `steps` is
    DDIM's.
    """
    config = pretrained.config
    check_arguments(n, steps, guidance_scale, scheduler, batch_size)
    if len(attributes_rows) != n:
        raise FedsynthError(f"{len(attributes_rows)} attribute rows for {n} subjects")
    if scheduler == "ddim" and steps > config.diffusion.train_timesteps:
        raise FedsynthError(
            f"--steps {steps} exceeds the {config.diffusion.train_timesteps} training timesteps"
        )
    cohort = Path(out).expanduser() / COHORT
    if cohort.is_dir() and any(cohort.iterdir()):
        raise FedsynthError(f"{cohort} already holds a cohort; use a new --out folder")
    device = next(pretrained.unet.parameters()).device
    chain = sampling_scheduler(config.diffusion, scheduler, steps)
    batches = [attributes_rows[i : i + batch_size] for i in range(0, n, batch_size)]
    bar = progress(range(len(batches) * len(chain.timesteps)), "sample", show_progress)
    generator = torch.Generator(device).manual_seed(seed)
    paths: list[Path] = []
    for batch in batches:
        values = np.stack([scale_attributes(row, config.data.attributes) for row in batch])
        latents = sample_latents(
            pretrained.unet,
            chain,
            torch.from_numpy(values).to(device),
            latent_shape(config),
            guidance_scale,
            generator,
            on_step=lambda: next(bar, None),
        )
        decoded = pretrained.decode(latents)
        for volume in decoded.clamp(0, 1)[:, 0].cpu().numpy():
            paths.append(cohort / f"syn-{len(paths) + 1:04d}.nii.gz")
            with atomic_path(paths[-1], mode=PUBLIC_MODE) as tmp:
                nib.save(_nifti(volume, config.data.spacing), tmp)
    next(bar, None)  # past the last step: closes the bar
    _write_manifest(cohort / MANIFEST, paths, attributes_rows, config)
    write_montage(Path(out).expanduser() / MONTAGE, paths, attributes_rows, config)
    settings = {"guidance_scale": guidance_scale, "steps": steps, "scheduler": scheduler}
    folder = published_path(pretrained.folder, out, "CHECKPOINTS")  # no home paths
    provenance = {"checkpoint": folder, "n": n, "seed": seed, **settings}
    atomic_write_text(
        Path(out).expanduser() / SAMPLING_JSON,
        json.dumps(provenance, indent=2) + "\n",
        PUBLIC_MODE,
    )
    return paths


def _write_manifest(
    path: Path, images: list[Path], rows: list[dict[str, float]], config: Config
) -> None:
    names = [a.name for a in config.data.attributes]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "subject", *names, "synthetic"])
    for image, row in zip(images, rows, strict=True):
        subject = image.name.removesuffix(".nii.gz")
        writer.writerow([image.name, subject, *(_cell(row[name]) for name in names), "yes"])
    atomic_write_text(path, buffer.getvalue(), PUBLIC_MODE)


def volume_title(image: Path | str, row: dict[str, float]) -> str:
    """The volume's name and the requested attributes one can check by eye."""
    parts = [image if isinstance(image, str) else image.name.removesuffix(".nii.gz")]
    for name, unit in (("lvedv", "mL"), ("lvesv", "mL")):
        if name in row:
            parts.append(f"{name.upper()} {row[name]:g} {unit}")
    if "phase" in row:
        parts.append("ES" if row["phase"] else "ED")
    return "  ".join(parts)


def _written(path: Path) -> nib.Nifti1Image:
    """A volume of a cohort as `_nifti` wrote it (voxels read when used)."""
    image = nib.load(path)
    assert isinstance(image, nib.Nifti1Image)
    return image


def write_montage(
    path: Path, images: list[Path], rows: list[dict[str, float]], config: Config
) -> None:
    """Basal-ish, mid and apical-ish slices (slices run base to apex) of the first 8 volumes."""
    shown = list(zip(images[:8], rows, strict=False))
    volumes = [np.asanyarray(_written(image).dataobj) for image, _ in shown]
    montage(path, volumes, [volume_title(image, row) for image, row in shown], config)


def slice_columns(depth: int) -> dict[str, int]:
    """The basal-ish, mid and apical-ish slice index of a volume of `depth` short-axis
    slices (they run base to apex): a quarter, half and three quarters of the way."""
    return {
        "basal": round(0.25 * (depth - 1)),
        "mid": depth // 2,
        "apical": round(0.75 * (depth - 1)),
    }


def montage(
    path: Path, volumes: list[np.ndarray], titles: list[str], config: Config, per_row: int = 2
) -> None:
    """Each (H, W, D) volume in [0, 1] as its basal-ish, mid and apical-ish slices, `per_row`
    volumes side by side (a grid that uses a page's width), rows top to bottom."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth = config.data.shape[2]
    columns = slice_columns(depth)
    sx, sy, _ = config.data.spacing
    across = max(1, min(per_row, len(volumes)))
    down = math.ceil(len(volumes) / across)
    fig = plt.figure(figsize=(7.5 * across, 2.8 * down), layout="constrained")
    subfigures = fig.subfigures(down, across)  # an array, or one SubFigure for one volume
    grid = list(np.ravel(subfigures)) if isinstance(subfigures, np.ndarray) else [subfigures]
    for subfig, volume, title in zip(grid, volumes, titles, strict=False):
        subfig.suptitle(title, fontsize=10)
        for ax, (label, k) in zip(subfig.subplots(1, 3), columns.items(), strict=True):
            ax.imshow(
                volume[:, :, k].T, cmap="gray", vmin=0, vmax=1, origin="lower", aspect=sy / sx
            )
            ax.set_title(f"{label} (slice {k + 1}/{depth})", fontsize=8)
            ax.axis("off")
    with atomic_path(path, mode=PUBLIC_MODE) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def requested_vs_measured(
    meter: VolumeMeter, volumes: torch.Tensor, rows: list[dict[str, float]]
) -> dict[str, dict]:
    """LV and RV cavities measured on volumes (N, 1, H, W, D) vs the mL each row requested
    for its phase (EDV at ED, ESV at ES): per side, `agreement` plus both lists."""
    measured = meter.measure(volumes)
    systole = np.array([row.get("phase", 0) == 1 for row in rows])
    report = {}
    for side in ("lv", "rv"):
        edv, esv = (np.array([row[f"{side}{p}"] for row in rows]) for p in ("edv", "esv"))
        requested = np.where(systole, esv, edv)
        report[side] = agreement(requested, measured[side]) | {
            "requested_ml": requested.round(1).tolist(),
            "measured_ml": measured[side].round(1).tolist(),
        }
    return report


def agreement_only(report: dict[str, dict]) -> dict[str, dict[str, float]]:
    """`requested_vs_measured`'s report without the per-volume lists: per side r, MAE, n."""
    return {
        side: {k: report[side][k] for k in ("pearson_r", "mae_ml", "n")} for side in ("lv", "rv")
    }


def controllability(
    checkpoint: str | Path,
    out: str | Path,
    paths: list[Path],
    rows: list[dict[str, float]],
    guidance_scale: float,
) -> dict | None:
    """Measured vs requested LV/RV cavity volumes of a written cohort, saved as
    out/controllability.json; None when the checkpoint has no anatomy meter."""
    location = meter_path(Path(checkpoint).expanduser())
    if not location.is_file():
        return None
    meter = VolumeMeter.from_state(load_torch(location))
    volumes = torch.stack([torch.from_numpy(np.asarray(_written(p).dataobj))[None] for p in paths])
    measured = requested_vs_measured(meter, volumes.float(), rows)
    report = {"guidance_scale": guidance_scale} | measured
    report_path = Path(out).expanduser() / "controllability.json"
    atomic_write_text(report_path, json.dumps(report, indent=2), PUBLIC_MODE)
    return report
