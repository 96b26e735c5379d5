"""A site's latents: encoded once with the frozen autoencoder, cached, re-encoded on change.

The cache is keyed on the content of exactly the files the manifest uses (and on the
checkpoint, its latent statistics and the data config): a replaced or withdrawn volume must
never stay in training, and a file the manifest does not name must not force a re-encode.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fedsynth.client.latents import cache_key, site_latents
from fedsynth.common.checkpoint import AUTOENCODER, load_pretrained
from fedsynth.common.data import open_site
from fedsynth.common.errors import FedsynthError


@pytest.fixture(scope="module")
def pretrained(tiny_checkpoint):
    return load_pretrained(tiny_checkpoint)


@pytest.fixture
def site(tmp_path, phantom_root) -> Path:
    """A copy of the phantom site with uncompressed volumes: a replaced volume of the same
    shape then has exactly the same size, as it often has in a real archive."""
    site = tmp_path / "site-1"
    shutil.copytree(phantom_root / "site-1", site)
    for image in sorted((site / "images").glob("*.nii.gz")):
        nib.save(nib.load(image), image.with_suffix(""))
        image.unlink()
    manifest = site / "manifest.csv"
    manifest.write_text(
        re.sub(r"^(images/[^,]+\.nii)\.gz,", r"\1,", manifest.read_text(), flags=re.M)
    )
    return site


def latents(pretrained, checkpoint, site, state):
    return site_latents(pretrained, checkpoint, site, state, show_progress=False)


def cached(state: Path) -> list[Path]:
    return sorted(state.glob("latents-*.pt"))


def same_size_other_content(path: Path) -> None:
    """Replace a volume by another one of the same shape, dtype, size and mtime."""
    before = path.stat()
    image = nib.load(path)
    data = np.flip(np.asarray(image.dataobj), axis=0).copy()
    nib.save(nib.Nifti1Image(data, image.affine, image.header), path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_latents_are_encoded_once_and_read_back(
    tmp_path, site, pretrained, tiny_checkpoint, monkeypatch
):
    state = tmp_path / "state"
    first = latents(pretrained, tiny_checkpoint, site, state)
    dataset, _ = open_site(site, pretrained.config.data, show_progress=False)
    volumes = torch.stack([dataset[i][0] for i in range(len(dataset))])
    assert torch.allclose(first.latents, pretrained.encode(volumes), atol=1e-5)
    assert first.n_subjects == 2 and first.subjects.tolist() == [0, 0, 1, 1]
    assert first.attributes.shape == (4, len(pretrained.config.data.attributes))
    assert len(cached(state)) == 1

    # a second call reads the cache, not the data; so does one after a touch (same bytes)
    image = site / "images" / "sub-001_es.nii"
    image.write_bytes(image.read_bytes())
    os.utime(image, ns=(1, 1))
    with monkeypatch.context() as patch:
        patch.setattr("fedsynth.client.latents.open_site", lambda *a, **k: 1 / 0)
        again = latents(pretrained, tiny_checkpoint, site, state)
    assert torch.equal(again.latents, first.latents)


@pytest.mark.parametrize("through_symlink", [False, True])
def test_a_volume_replaced_with_the_same_size_and_mtime_is_encoded_again(
    tmp_path, site, pretrained, tiny_checkpoint, through_symlink
):
    volume = site / "images" / "sub-001_es.nii"
    if through_symlink:  # the manifest names a link; its target is what changes
        target = site / "store" / volume.name
        target.parent.mkdir()
        volume.rename(target)
        volume.symlink_to(Path("..") / "store" / volume.name)
        volume = target
    state = tmp_path / "state"
    before = latents(pretrained, tiny_checkpoint, site, state)
    old_cache = cached(state)

    same_size_other_content(volume)
    after = latents(pretrained, tiny_checkpoint, site, state)
    assert cached(state) != old_cache and len(cached(state)) == 1
    assert not torch.allclose(after.latents[1], before.latents[1])  # row 2 is that volume
    assert torch.equal(after.latents[[0, 2, 3]], before.latents[[0, 2, 3]])


def test_a_withdrawn_row_leaves_training_and_the_state_dir(
    tmp_path, site, pretrained, tiny_checkpoint
):
    state = tmp_path / "state"
    before = latents(pretrained, tiny_checkpoint, site, state)
    old_cache = cached(state)
    manifest = site / "manifest.csv"
    header, *rows = manifest.read_text().splitlines()
    withdrawn = rows.pop(2)  # sub-002's ED volume: consent withdrawn
    assert withdrawn.startswith("images/sub-002_ed.nii,")
    manifest.write_text("\n".join([header, *rows]) + "\n")  # its file stays on disk

    after = latents(pretrained, tiny_checkpoint, site, state)
    assert cached(state) != old_cache and len(cached(state)) == 1
    assert torch.equal(after.latents, before.latents[[0, 1, 3]])
    assert after.subjects.tolist() == [0, 0, 1]
    stored = torch.load(cached(state)[0], weights_only=True)["latents"]
    assert not any(torch.equal(row, before.latents[2]) for row in stored)

    # every row withdrawn: nothing to train on, and no old latents left behind either
    manifest.write_text(header + "\n")
    with pytest.raises(FedsynthError, match="no usable rows"):
        latents(pretrained, tiny_checkpoint, site, state)
    assert cached(state) == []


def test_files_the_manifest_does_not_use_do_not_invalidate(
    tmp_path, site, pretrained, tiny_checkpoint
):
    key = cache_key(pretrained, tiny_checkpoint, site)
    (site / "notes.txt").write_text("scanner serviced on Monday\n")
    shutil.copy(site / "images" / "sub-001_ed.nii", site / "images" / "unlisted.nii")
    same_size_other_content(site / "images" / "unlisted.nii")
    assert cache_key(pretrained, tiny_checkpoint, site) == key


def test_the_key_covers_checkpoint_latent_statistics_and_data_config(
    tmp_path, site, pretrained, tiny_checkpoint
):
    key = cache_key(pretrained, tiny_checkpoint, site)
    assert cache_key(pretrained, tiny_checkpoint, site) == key  # deterministic

    other = tmp_path / "other-checkpoint"
    shutil.copytree(tiny_checkpoint, other)
    weights = torch.load(other / AUTOENCODER, weights_only=True)
    name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[name] = weights[name] + 1e-3
    torch.save(weights, other / AUTOENCODER)
    assert cache_key(pretrained, other, site) != key

    for stat in ("latent_mean", "latent_std"):
        values = list(pretrained.metadata[stat])
        values[0] += 1e-3
        moved = dataclasses.replace(pretrained, metadata=pretrained.metadata | {stat: values})
        assert cache_key(moved, tiny_checkpoint, site) != key, stat

    config = pretrained.config
    low, high = config.data.intensity_percentiles
    data = dataclasses.replace(config.data, intensity_percentiles=(low + 0.5, high))
    rescaled = dataclasses.replace(pretrained, config=dataclasses.replace(config, data=data))
    assert cache_key(rescaled, tiny_checkpoint, site) != key


def test_a_changed_label_map_encodes_again(site, pretrained, tiny_checkpoint):
    """A row's label map centres the grid on its heart: the volume trained on changes."""
    key = cache_key(pretrained, tiny_checkpoint, site)
    label = sorted((site / "labels").iterdir())[0]
    image = nib.load(label)
    data = np.roll(np.asarray(image.dataobj), 3, axis=0)
    nib.save(nib.Nifti1Image(data, image.affine, image.header), label)
    assert cache_key(pretrained, tiny_checkpoint, site) != key
