"""Shared fixtures: the tiny config, and phantoms with a tiny pretrained checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from fedsynth.common.config import Config, load_config

# a few seconds of pretraining: enough for files, shapes and an anatomy meter
TINY_PRETRAIN = {
    "autoencoder.steps": 5,
    "training.pretrain-steps": 5,
    "training.segmenter-steps": 4,  # an anatomy meter, so sampling reports controllability
    "diffusion.train-timesteps": 12,  # keeps the full DDPM chain short
    "sampling.steps": 3,
}


@pytest.fixture(autouse=True)
def console_as_it_was():
    """A test that runs an app or the CLI in process gets fedsynth's console (a handler on
    the root logger, common/logs.py); the next test starts without it, whatever the order."""
    root, fedsynth = logging.getLogger(), logging.getLogger("fedsynth")
    handlers, level = list(root.handlers), fedsynth.level
    yield
    added = [h for h in root.handlers if h not in handlers and type(h).__name__ == "_Console"]
    for handler in added:
        root.removeHandler(handler)
    fedsynth.setLevel(level)


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: on a shared 2-core machine its thread pool spends
    more time waiting than working on tiny tensors (an index_add_ took 58 ms on 2 threads,
    25 us on 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_config() -> Config:
    return load_config("tiny")


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    """One public set (4 subjects) and one site (2 subjects) of tiny phantoms."""
    from fedsynth.simulations.phantoms import generate_cohorts

    root = tmp_path_factory.mktemp("phantoms")
    generate_cohorts(root, sites=1, subjects=2, seed=0, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, phantom_root) -> Path:
    """A checkpoint pretrained for a few steps on the public phantoms (one thread)."""
    from fedsynth.server.pretrain import pretrain

    out = tmp_path_factory.mktemp("tiny-ckpt") / "ckpt"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pretrain(load_config("tiny", TINY_PRETRAIN), phantom_root / "public", out, False)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="session")
def site_phantoms(tmp_path_factory) -> Path:
    """Three sites of 6 tiny phantom subjects each (and one public): the sites of the
    studies tests/study_driver.py runs."""
    from fedsynth.simulations.phantoms import generate_cohorts

    root = tmp_path_factory.mktemp("site-phantoms")
    generate_cohorts(root, sites=3, subjects=6, seed=0, public_subjects=1, progress=False)
    return root
