"""A `flwr run` simulation's data: phantom sites, the public checkpoint, validation data.

Generated once and cached under the cache dir: phantom sites and public set by the
generator's PHANTOM_VERSION and (sites, subjects, seed); the public checkpoint by a hash of
what pretraining depends on, of the public manifest, the phantom version (its files can
change while the manifest does not) and the reader's geometry.GRID_VERSION; public
held-out validation subjects from another seed.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

from fedsynth.common.checkpoint import METADATA, file_sha256
from fedsynth.common.config import Config, pretraining_hash
from fedsynth.common.feature_net import ensure_feature_net
from fedsynth.common.geometry import GRID_VERSION
from fedsynth.server.study import DEFAULT_PUBLIC_SUBJECTS, SimulatedData
from fedsynth.simulations.site_domain import SiteDomain

log = logging.getLogger(__name__)

VALIDATION_SUBJECTS = 4  # public held-out phantom subjects (8 volumes) for validation
SITE_HELD_OUT_SUBJECTS = 30  # per site: held-out subjects of its profile (simulation only);
# 60 volumes: enough for a Frechet distance whose spread over sampling seeds is stated


def phantom_folder(
    cache: Path,
    config: Config,
    subjects: int,
    held_out: bool = False,
    public_subjects: int = DEFAULT_PUBLIC_SUBJECTS,
) -> Path:
    """Phantom sites and a public set of `public_subjects`, or held-out subjects of the
    same profiles (another seed: subjects neither the checkpoint nor any site ever saw),
    generated once and cached.

    The held-out folder holds public/ (VALIDATION_SUBJECTS, for per-round validation) and
    site-1..K (SITE_HELD_OUT_SUBJECTS each, for the simulation-only site-domain check);
    its name carries that count, so a folder of another count is never reused.
    """
    from fedsynth.simulations.phantoms import PHANTOM_VERSION, generate_cohorts

    sites, seed = config.federation.sites, config.seed
    version = cache / "phantoms" / f"v{PHANTOM_VERSION}"  # a changed generator: new folders
    if held_out:
        folder = version / f"held-out-sites{sites}-subjects{SITE_HELD_OUT_SUBJECTS}-seed{seed}"
        count, public, draw = SITE_HELD_OUT_SUBJECTS, VALIDATION_SUBJECTS, seed + 1
    else:
        folder = version / f"sites{sites}-subjects{subjects}-seed{seed}-public{public_subjects}"
        count, public, draw = subjects, public_subjects, seed
    if not (folder / f"site-{sites}" / "manifest.csv").is_file():
        log.info("generating phantoms in %s", folder)
        generate_cohorts(
            folder,
            sites,
            count,
            draw,
            public_subjects=public,
            progress=False,
            profile_seed=seed,
        )
    return folder


def simulated_data(
    config: Config, cache: Path, subjects: int, public_subjects: int = DEFAULT_PUBLIC_SUBJECTS
) -> SimulatedData:
    """Phantoms (sites of `subjects`, a public set of `public_subjects`), a public
    checkpoint pretrained on their public set, validation data, held-out subjects of each
    site's profile and the site-domain check on them, which the server builds on its own
    loaded checkpoint (a `flwr run` simulation passes it to the ServerApp)."""
    phantoms = phantom_folder(cache, config, subjects, public_subjects=public_subjects)
    data_hash = file_sha256(phantoms / "public" / "manifest.csv")
    grid = f"g{GRID_VERSION}"  # the same files read onto another grid: another checkpoint
    key = f"{pretraining_hash(config)}-{data_hash[:12]}-{phantoms.parent.name}-{grid}"
    checkpoint = cache / "pretrained" / key  # with the phantom version: files, not just CSV
    if not (checkpoint / METADATA).is_file():  # written last: the checkpoint is whole
        from fedsynth.server.pretrain import pretrain

        log.info("pretraining on public phantoms into %s", checkpoint)
        pretrain(config, phantoms / "public", checkpoint, show_progress=True)
    # a checkpoint cached before evaluation feature nets existed gets them from the same data
    ensure_feature_net(checkpoint, phantoms / "public", config, show_progress=True)
    held_out = phantom_folder(cache, config, subjects, held_out=True)
    check = partial(SiteDomain, folder=held_out, config=config)
    return SimulatedData(phantoms, checkpoint, held_out / "public", held_out, check)
