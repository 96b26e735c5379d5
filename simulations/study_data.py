"""A `flwr run` simulation's data: phantom sites, the public checkpoint, validation data.

Generated once and cached under the cache dir: phantom sites and public set by the
generator's PHANTOM_VERSION and (sites, subjects, seed); the public checkpoint by a hash of
what pretraining depends on, of the public manifest and the phantom version (its files can
change while the manifest does not); public held-out validation subjects from another seed.
"""

from __future__ import annotations

from pathlib import Path

from fedsynth.common.checkpoint import METADATA, file_sha256
from fedsynth.common.config import Config, pretraining_hash
from fedsynth.common.feature_net import ensure_feature_net
from fedsynth.server.study import SimulatedData

VALIDATION_SUBJECTS = 4  # public held-out phantom subjects (8 volumes) for validation


def phantom_folder(cache: Path, config: Config, subjects: int, held_out: bool = False) -> Path:
    """Phantom sites and public set (or a public held-out set), generated once and cached."""
    from fedsynth.simulations.phantoms import PHANTOM_VERSION, generate_cohorts

    sites, seed = config.federation.sites, config.seed
    version = cache / "phantoms" / f"v{PHANTOM_VERSION}"  # a changed generator: new folders
    if held_out:  # another seed: public-profile subjects the checkpoint never saw
        sites, seed, folder = 1, seed + 1, version / f"held-out-seed{seed}"
    else:
        folder = version / f"sites{sites}-subjects{subjects}-seed{seed}"
    if not (folder / f"site-{sites}" / "manifest.csv").is_file():
        print(f"[fedsynth] generating phantoms in {folder}", flush=True)
        count = 1 if held_out else subjects
        public = VALIDATION_SUBJECTS if held_out else None
        generate_cohorts(folder, sites, count, seed, public_subjects=public, progress=False)
    return folder


def simulated_data(config: Config, cache: Path, subjects: int) -> SimulatedData:
    """Phantoms, a public checkpoint pretrained on their public set, and validation data."""
    phantoms = phantom_folder(cache, config, subjects)
    data_hash = file_sha256(phantoms / "public" / "manifest.csv")
    key = f"{pretraining_hash(config)}-{data_hash[:12]}-{phantoms.parent.name}"
    checkpoint = cache / "pretrained" / key  # with the phantom version: files, not just CSV
    if not (checkpoint / METADATA).is_file():  # written last: the checkpoint is whole
        from fedsynth.server.pretrain import pretrain

        print(f"[fedsynth] pretraining on public phantoms into {checkpoint}", flush=True)
        pretrain(config, phantoms / "public", checkpoint, show_progress=True)
    # a checkpoint cached before evaluation feature nets existed gets them from the same data
    ensure_feature_net(checkpoint, phantoms / "public", config, show_progress=True)
    validation = phantom_folder(cache, config, subjects, held_out=True) / "public"
    return SimulatedData(phantoms, checkpoint, validation)
