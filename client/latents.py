"""A site's volumes encoded once by the frozen public autoencoder, cached in its state dir.

DP-SGD then trains on the cached latents only: encoding is the slow part of reading a site
and the autoencoder never changes during a study. The cache is keyed by the checkpoint
(autoencoder weights and latent statistics), the data config, and the name, size and
modification time of every file in the site folder, so any change to the data or the
model encodes again instead of training on stale latents. The state dir is owner-only
(0700) and so is the cache (0600): the public autoencoder decodes latents to volumes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fedsynth.common.checkpoint import AUTOENCODER, Pretrained, file_sha256, load_torch
from fedsynth.common.data import open_site
from fedsynth.common.io import atomic_path, private_dir
from fedsynth.common.progress import progress


@dataclass
class SiteLatents:
    """Normalised latents (N, C, H, W, D), scaled attributes (N, A), subject index (N,)."""

    latents: torch.Tensor
    attributes: torch.Tensor
    subjects: torch.Tensor

    @property
    def n_subjects(self) -> int:
        return int(self.subjects.max()) + 1 if len(self.subjects) else 0


def _folder_fingerprint(root: Path) -> list[tuple[str, int, int]]:
    entries = []
    for folder, _, files in os.walk(root):
        for name in files:
            stat = (Path(folder) / name).stat()
            entries.append(
                (str(Path(folder, name).relative_to(root)), stat.st_size, stat.st_mtime_ns)
            )
    return sorted(entries)


def cache_key(pretrained: Pretrained, checkpoint: Path, data_path: Path) -> str:
    """Changes whenever the autoencoder, its latent statistics, the data config or data do."""
    facts = {
        "autoencoder": file_sha256(checkpoint / AUTOENCODER),
        "latent_mean": pretrained.metadata["latent_mean"],
        "latent_std": pretrained.metadata["latent_std"],
        "data": asdict(pretrained.config.data),
        "files": _folder_fingerprint(data_path),
    }
    blob = json.dumps(facts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def site_latents(
    pretrained: Pretrained,
    checkpoint: str | Path,
    data_path: str | Path,
    state_dir: str | Path,
    show_progress: bool = True,
) -> SiteLatents:
    """The site's latents from the cache, or encoded now (checked first) and cached."""
    checkpoint, data_path = Path(checkpoint).expanduser(), Path(data_path).expanduser()
    state_dir = private_dir(state_dir)
    path = state_dir / f"latents-{cache_key(pretrained, checkpoint, data_path)}.pt"
    if path.is_file():
        return SiteLatents(**load_torch(path))
    dataset, _ = open_site(data_path, pretrained.config.data, show_progress=show_progress)
    subject_of = {row: s for s, rows in enumerate(dataset.subject_rows) for row in rows}
    device = next(pretrained.autoencoder.parameters()).device
    latents, attributes = [], []
    for i in progress(range(len(dataset)), "encode site", show_progress):
        volume, values = dataset[i]
        latents.append(pretrained.encode(volume[None].to(device)).cpu())
        attributes.append(values)
    cached = SiteLatents(
        torch.cat(latents),
        torch.stack(attributes),
        torch.tensor([subject_of[i] for i in range(len(dataset))]),
    )
    with atomic_path(path) as tmp:  # owner-only: latents decode to the site's volumes
        torch.save(asdict(cached), tmp)
    for stale in state_dir.glob("latents-*.pt"):  # of older data or another checkpoint
        if stale != path:
            stale.unlink()
    return cached
