"""A site's volumes encoded once by the frozen public autoencoder, cached in its state dir.

DP-SGD then trains on the cached latents only: encoding is the slow part of reading a site
and the autoencoder never changes during a study. The cache is keyed by the checkpoint
(autoencoder weights and latent statistics), the data config, the reader's grid
(geometry.GRID_VERSION), and the content (SHA-256) of exactly the files the manifest uses:
the manifest itself, every image it names and every label map (it places the heart on
the grid), read through symlinks. A replaced volume (whatever its size and modification time) or a
withdrawn row (consent withdrawal) therefore encodes again, and the old cache is deleted
before that, so a withdrawn subject's latents leave the state dir at the next round; a
file the manifest does not name changes nothing. Hashing reads every used image once per
round (about as fast as the disk; encoding costs far more). The state dir is owner-only
(0700) and so is the cache (0600): the public autoencoder decodes latents to volumes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fedsynth.common.checkpoint import AUTOENCODER, Pretrained, file_sha256, load_torch
from fedsynth.common.config import DataConfig
from fedsynth.common.data import MANIFEST, check_site, open_site
from fedsynth.common.geometry import GRID_VERSION
from fedsynth.common.io import atomic_path, private_dir
from fedsynth.common.progress import progress

ENCODE_BATCH = 16  # volumes per autoencoder call (one shape: data.shape)


@dataclass
class SiteLatents:
    """Normalised latents (N, C, H, W, D), scaled attributes (N, A), subject index (N,)."""

    latents: torch.Tensor
    attributes: torch.Tensor
    subjects: torch.Tensor

    @property
    def n_subjects(self) -> int:
        return int(self.subjects.max()) + 1 if len(self.subjects) else 0


def _content_sha256(path: Path) -> str:
    """SHA-256 of a file's content; a file that cannot be read is keyed as such (training
    then rejects its row with the reason)."""
    try:
        with path.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as exc:
        return f"unreadable: {exc.strerror}"


def _data_fingerprint(data_path: Path, data_cfg: DataConfig) -> dict:
    """The content of the manifest and of each image and label map its rows name (rows not
    yet checked for readable volumes, so a row fixed later also changes the key)."""
    manifest = check_site(data_path, data_cfg, read_images=False, show_progress=False)
    return {
        "manifest": _content_sha256(manifest.root / MANIFEST),
        "images": [(r.row, _content_sha256(r.image)) for r in manifest.records],
        "labels": [(r.row, _content_sha256(r.label)) for r in manifest.records if r.label],
        "grid": GRID_VERSION,
    }


def cache_key(pretrained: Pretrained, checkpoint: Path, data_path: Path) -> str:
    """Changes whenever the autoencoder, its latent statistics, the data config, the grid or
    the content of the manifest or of an image or label map it uses do (16 hex digits of a
    SHA-256)."""
    facts = {
        "autoencoder": file_sha256(checkpoint / AUTOENCODER),
        "latent_mean": pretrained.metadata["latent_mean"],
        "latent_std": pretrained.metadata["latent_std"],
        "data": asdict(pretrained.config.data),
        "files": _data_fingerprint(data_path, pretrained.config.data),
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
    for stale in state_dir.glob("latents-*.pt"):  # of older data or another checkpoint
        stale.unlink()  # first: a withdrawn subject's latents go even if encoding fails
    dataset, _ = open_site(
        data_path, pretrained.config.data, show_progress=show_progress, keep_volumes=True
    )
    subject_of = {row: s for s, rows in enumerate(dataset.subject_rows) for row in rows}
    device = next(pretrained.autoencoder.parameters()).device
    latents, attributes = [], []
    batches = torch.arange(len(dataset)).split(ENCODE_BATCH)
    for rows in progress(batches, "encode site", show_progress):
        items = [dataset[int(i)] for i in rows]
        volumes = torch.stack([volume for volume, _ in items]).to(device)
        latents.append(pretrained.encode(volumes).cpu())
        attributes += [values for _, values in items]
    cached = SiteLatents(
        torch.cat(latents),
        torch.stack(attributes),
        torch.tensor([subject_of[i] for i in range(len(dataset))]),
    )
    with atomic_path(path) as tmp:  # owner-only: latents decode to the site's volumes
        torch.save(asdict(cached), tmp)
    return cached
