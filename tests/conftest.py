"""Shared fixtures."""

from __future__ import annotations

import pytest

from fedsynth.common.config import Config, load_config


@pytest.fixture(scope="session")
def tiny_config() -> Config:
    return load_config("tiny")
