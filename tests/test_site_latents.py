"""A site's latents: encoded once with the frozen autoencoder, cached, re-encoded on change."""

from __future__ import annotations

import os
import shutil

import torch

from fedsynth.client.latents import site_latents
from fedsynth.common.checkpoint import load_pretrained
from fedsynth.common.data import open_site


def test_latents_are_cached_per_data_and_checkpoint(
    tmp_path, phantom_root, tiny_checkpoint, monkeypatch
):
    pretrained = load_pretrained(tiny_checkpoint)
    site = tmp_path / "site-1"
    shutil.copytree(phantom_root / "site-1", site)
    state = tmp_path / "state"
    first = site_latents(pretrained, tiny_checkpoint, site, state, show_progress=False)

    dataset, _ = open_site(site, pretrained.config.data, show_progress=False)
    volumes = torch.stack([dataset[i][0] for i in range(len(dataset))])
    assert torch.allclose(first.latents, pretrained.encode(volumes), atol=1e-5)
    assert first.n_subjects == 2 and first.subjects.tolist() == [0, 0, 1, 1]
    assert first.attributes.shape == (4, len(pretrained.config.data.attributes))
    cached = list(state.glob("latents-*.pt"))
    assert len(cached) == 1

    # a second call reads the cache, not the data
    with monkeypatch.context() as patch:
        patch.setattr("fedsynth.client.latents.open_site", lambda *a, **k: 1 / 0)
        again = site_latents(pretrained, tiny_checkpoint, site, state, show_progress=False)
    assert torch.equal(again.latents, first.latents)

    # changed data: encoded again, and the stale cache is gone
    image = sorted((site / "images").iterdir())[0]
    image.write_bytes(image.read_bytes())  # same bytes, new mtime: cannot know it is equal
    os.utime(image, ns=(1, 1))
    site_latents(pretrained, tiny_checkpoint, site, state, show_progress=False)
    assert list(state.glob("latents-*.pt")) != cached and len(list(state.glob("*.pt"))) == 1
