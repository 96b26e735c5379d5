"""Per site, held-out volumes next to samples for their attributes from each model (dp-gap).

A loss or a distance says that a model moved towards a site's patients; a montage shows a
reader what moved. Rows: the real held-out volumes, then each model's samples for the same
attributes (one sampling seed, config.seed, for every model: the differences between rows
come from the weights); columns: the basal, mid and apical slice (common/sampling.py
`slice_columns`) of the ED and ES volumes of MONTAGE_SUBJECTS held-out subjects.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from matplotlib.figure import Figure

from fedsynth.common.config import Config
from fedsynth.common.io import PUBLIC_MODE, atomic_path
from fedsynth.common.sampling import slice_columns, volume_title
from fedsynth.simulations.site_domain import SiteDomain

log = logging.getLogger(__name__)

MONTAGE_SUBJECTS = 2  # held-out subjects per site, each at ED and ES
PHASES = {0: "ED", 1: "ES"}  # the `phase` attribute's values


def montage_volumes(subjects: list[str], rows: list[dict[str, float]]) -> list[int]:
    """Indices of the ED then ES volume of the first MONTAGE_SUBJECTS subjects that have
    both phases (`subjects` and attribute `rows` are per volume, in manifest order).
    Raises ValueError when fewer subjects have both."""
    phases: dict[str, dict[int, int]] = {}
    for index, (subject, row) in enumerate(zip(subjects, rows, strict=True)):
        phases.setdefault(subject, {}).setdefault(int(row.get("phase", 0)), index)
    chosen = [found for found in phases.values() if set(found) >= set(PHASES)]
    if len(chosen) < MONTAGE_SUBJECTS:
        raise ValueError(
            f"{len(chosen)} held-out subjects have an ED and an ES volume; "
            f"a montage shows {MONTAGE_SUBJECTS}"
        )
    return [found[phase] for found in chosen[:MONTAGE_SUBJECTS] for phase in PHASES]


def draw_montage(
    title: str,
    real: torch.Tensor,
    samples: dict[str, torch.Tensor],
    titles: list[str],
    config: Config,
) -> Figure:
    """A grid of 1 + len(samples) rows ("real", then each model by name) by 3 columns per
    volume (basal, mid, apical slice); `real` and each sample are (V, 1, H, W, D) in
    [0, 1], `titles` one per volume."""
    depth = config.data.shape[2]
    columns = slice_columns(depth)
    sx, sy, _ = config.data.spacing
    rows = {"real": real, **samples}
    width = len(columns) * len(real)
    fig = Figure(figsize=(1.15 * width, 1.25 * len(rows) + 0.9), dpi=100, layout="constrained")
    axes = fig.subplots(len(rows), width, squeeze=False)
    for r, (name, volumes) in enumerate(rows.items()):
        for v, volume in enumerate(volumes[:, 0].numpy()):
            for c, (label, k) in enumerate(columns.items()):
                ax = axes[r, v * len(columns) + c]
                ax.imshow(
                    volume[:, :, k].T, cmap="gray", vmin=0, vmax=1, origin="lower", aspect=sy / sx
                )
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    head = f"{titles[v]}\n" if label == "mid" else "\n"
                    ax.set_title(f"{head}{label} ({k + 1}/{depth})", fontsize=7)
                if v == 0 and c == 0:
                    ax.set_ylabel(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    return fig


def write_site_montages(
    domain: SiteDomain, models: dict[str, dict[str, torch.Tensor]], out: Path, prefix: str
) -> list[Path]:
    """Per site of `domain`, a montage of its `montage_volumes` and one sample of each of
    `models` (name -> UNet weights) for their attributes, written to
    out/`prefix`-montage-site-K.png; returns the paths."""
    paths = []
    for site, (real, _, attributes) in domain.sites.items():
        chosen = montage_volumes(domain.subjects[site], domain.rows[site])
        index = torch.tensor(chosen)
        samples = {
            name: domain.sample(domain.load(weights), attributes[index.to(attributes.device)])
            for name, weights in models.items()
        }
        rows = domain.rows[site]
        titles = [
            volume_title(f"subject {1 + n // len(PHASES)}", rows[i]) for n, i in enumerate(chosen)
        ]
        fig = draw_montage(
            f"{site}: held-out volumes and samples for their attributes",
            real[index],
            samples,
            titles,
            domain.config,
        )
        paths.append(Path(out) / f"{prefix}-montage-{site}.png")
        with atomic_path(paths[-1], mode=PUBLIC_MODE) as tmp:
            fig.savefig(tmp)
        log.info("wrote %s", paths[-1])
    return paths
