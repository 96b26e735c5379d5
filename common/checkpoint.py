"""Checkpoint folders: both networks, the config, and metadata, each written atomically.

A folder holds `autoencoder.pt`, `unet.pt` (state dicts), `config.yaml` (the resolved
config the networks were built from), `metadata.json` (versions, config hash, data
manifest hash, steps, per-channel latent mean and std) and, while training, `state/` with what a
killed run needs to continue where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from monai.networks.nets import AutoencoderKL

from fedsynth.common.config import Config, config_from_dict, config_hash, to_yaml
from fedsynth.common.errors import FedsynthError
from fedsynth.common.io import PUBLIC_MODE, atomic_path, atomic_write_text
from fedsynth.common.models import ConditionedUNet, build_autoencoder

AUTOENCODER = "autoencoder.pt"
UNET = "unet.pt"
CONFIG = "config.yaml"
METADATA = "metadata.json"
PUBLIC_ATTRIBUTES = "public_attributes.csv"  # the public set's attributes, for `sample`


def save_torch(path: Path, obj: Any) -> None:
    """torch.save, atomically, readable by all (0644): checkpoints are shared artefacts."""
    with atomic_path(path, mode=PUBLIC_MODE) as tmp:
        torch.save(obj, tmp)


def load_torch(path: Path) -> Any:
    """torch.load of a file this project wrote (tensors, numbers, strings, lists, dicts)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise FedsynthError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None


def versions() -> dict[str, str]:
    return {name: version(name) for name in ("fedsynth", "torch", "monai", "opacus", "flwr")}


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def weights_sha256(weights: Mapping[str, torch.Tensor], keys: Iterable[str]) -> str:
    """SHA-256 of the named tensors (by name, sorted: name, dtype, shape and bytes), so
    two holders of a checkpoint can check they hold the same frozen weights without
    sending them; the empty set of keys has a hash too."""
    digest = hashlib.sha256()
    for key in sorted(keys):
        tensor = weights[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Pretrained:
    """Networks and facts read back from a checkpoint folder."""

    config: Config
    autoencoder: AutoencoderKL
    unet: ConditionedUNet
    metadata: dict
    folder: Path  # where it was read from (a cohort's sampling.json names it)

    @torch.no_grad()
    def encode(self, volumes: torch.Tensor) -> torch.Tensor:
        """Volumes (B, 1, H, W, D) to the normalised latents the UNet is trained on."""
        return normalise_latents(self.autoencoder.encode(volumes)[0], self.metadata)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents back to volumes (B, 1, H, W, D)."""
        return self.autoencoder.decode(denormalise_latents(latents, self.metadata))


def latent_statistics(latents: torch.Tensor) -> dict[str, list[float]]:
    """Per-channel mean and std of (N, C, ...) latents, as metadata.

    Per channel, not one scale factor: without a KL term worth the name the channels'
    means sit far from zero, and diffusion from unit noise then overshoots (samples of
    twice the data's spread, noise-like after decoding).
    """
    dims = [0, *range(2, latents.dim())]
    return {
        "latent_mean": latents.mean(dims).tolist(),
        "latent_std": latents.std(dims).tolist(),
    }


def _per_channel(values: list[float], like: torch.Tensor) -> torch.Tensor:
    shape = (1, len(values)) + (1,) * (like.dim() - 2)
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(shape)


def normalise_latents(latents: torch.Tensor, stats: dict) -> torch.Tensor:
    mean, std = stats["latent_mean"], stats["latent_std"]
    return (latents - _per_channel(mean, latents)) / _per_channel(std, latents)


def denormalise_latents(latents: torch.Tensor, stats: dict) -> torch.Tensor:
    mean, std = stats["latent_mean"], stats["latent_std"]
    return latents * _per_channel(std, latents) + _per_channel(mean, latents)


def write_metadata(folder: Path, config: Config, **facts: Any) -> dict:
    """Write config.yaml and metadata.json (versions, config hash and the given facts)."""
    metadata = {"versions": versions(), "config_hash": config_hash(config), **facts}
    atomic_write_text(folder / CONFIG, to_yaml(config), PUBLIC_MODE)
    atomic_write_text(folder / METADATA, json.dumps(metadata, indent=2) + "\n", PUBLIC_MODE)
    return metadata


def read_metadata(folder: Path) -> dict:
    path = Path(folder) / METADATA
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FedsynthError(f"{folder} is not a checkpoint folder (no {METADATA})") from None
    except json.JSONDecodeError as exc:
        raise FedsynthError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None


def public_sha256(folder: Path, unet: Mapping[str, torch.Tensor], frozen: Iterable[str]) -> str:
    """One SHA-256 of what a site must share with the server besides the UNet tensors that
    travel: the checkpoint folder's config hash and latent statistics (metadata.json; the
    config hash covers config.yaml, which load_pretrained checks against it), its
    autoencoder file, and the `frozen` tensors of `unet`. Raises FedsynthError when the
    folder has no metadata."""
    metadata = read_metadata(folder)
    facts = {k: metadata.get(k) for k in ("config_hash", "latent_mean", "latent_std")}
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode())
    digest.update(file_sha256(Path(folder) / AUTOENCODER).encode())
    digest.update(weights_sha256(unet, frozen).encode())
    return digest.hexdigest()


def load_pretrained(folder: str | Path, device: torch.device | str = "cpu") -> Pretrained:
    """Rebuild both networks from a finished checkpoint folder, in eval mode on `device`."""
    import yaml

    folder = Path(folder).expanduser()
    metadata = read_metadata(folder)
    for name in (AUTOENCODER, UNET, CONFIG):
        if not (folder / name).is_file():
            raise FedsynthError(f"checkpoint {folder} is incomplete: no {name}")
    config = config_from_dict(yaml.safe_load((folder / CONFIG).read_text()))
    if config_hash(config) != metadata.get("config_hash"):
        raise FedsynthError(f"checkpoint {folder}: config.yaml does not match metadata.json")
    if "latent_std" not in metadata:
        raise FedsynthError(f"checkpoint {folder} is unfinished (no latent statistics yet)")
    autoencoder, unet = build_autoencoder(config), ConditionedUNet(config)
    autoencoder.load_state_dict(load_torch(folder / AUTOENCODER))
    unet.load_state_dict(load_torch(folder / UNET))
    autoencoder, unet = autoencoder.to(device).eval(), unet.to(device).eval()
    return Pretrained(config, autoencoder, unet, metadata, folder.resolve())
