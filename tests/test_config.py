"""The config is checked once at load: every bad value is named with its key and what is allowed."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedsynth.common.config import (
    ADDED_KEYS,
    ConfigError,
    config_from_dict,
    config_hash,
    load_config,
    parse_assignments,
    presets,
    pretraining_hash,
    to_dict,
    to_yaml,
)


def write(tmp_path: Path, text: str, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_presets_load_and_tiny_inherits_default():
    assert {"default", "tiny"} <= set(presets())
    default, tiny = load_config("default"), load_config("tiny")
    assert default.autoencoder.channels == (16, 32) and tiny.autoencoder.channels == (8, 16, 16)
    # what tiny does not list comes from default
    assert tiny.data.shape == default.data.shape == (32, 32, 8)
    assert tiny.privacy.target_epsilon == default.privacy.target_epsilon == 10.0
    assert tiny.privacy.delta == pytest.approx(1e-5)
    assert [a.name for a in tiny.data.attributes] == [a.name for a in default.data.attributes]
    assert default.data.attribute("sex").discrete


def test_large_preset_is_the_default_at_64x64x16_with_one_more_autoencoder_level():
    from fedsynth.common.models import latent_shape

    default, large = load_config("default"), load_config("large")
    assert large.data.shape == (64, 64, 16) and large.autoencoder.channels == (16, 32, 64)
    # the same field of view (mm) at twice the resolution on every axis
    for n, mm, n0, mm0 in zip(
        large.data.shape, large.data.spacing, default.data.shape, default.data.spacing, strict=True
    ):
        assert n * mm == n0 * mm0 and n == 2 * n0
    assert latent_shape(large) == (3, 16, 16, 16) and latent_shape(default) == (3, 16, 16, 8)
    assert large.unet == default.unet and large.privacy == default.privacy


def test_roundtrip_and_hash():
    config = load_config("tiny")
    assert config_from_dict(to_dict(config)) == config
    assert config_hash(config) == config_hash(config_from_dict(to_dict(config)))
    other = load_config("tiny", {"privacy.target-epsilon": 3})
    assert config_hash(other) != config_hash(config)
    assert "target-epsilon: 3.0" in to_yaml(other)


def test_a_config_saved_before_a_key_was_added_loads_with_what_it_ran_with(tmp_path):
    """A checkpoint's or run's config.yaml written before federation.server-learning-rate,
    training.pretrain-ema-decay, -warmup-steps, -schedule, training.finetune-optimizer and
    its -state existed: it loads (as FedAvg, rate 1, pretrained at a constant rate without a
    moving average, AdamW at the sites started fresh each round), keeps its hash, and a full
    file without the keys loads too; at any other value the hash differs."""
    config = load_config("tiny", {"training.finetune-optimizer-state": "fresh"})
    assert config.training.pretrain_schedule == "constant"
    assert config.training.pretrain_warmup_steps == 0
    old = to_dict(config)
    assert set(ADDED_KEYS) == {
        ("federation", "server-learning-rate"),
        ("training", "pretrain-ema-decay"),
        ("training", "pretrain-warmup-steps"),
        ("training", "pretrain-schedule"),
        ("training", "finetune-optimizer"),
        ("training", "finetune-optimizer-state"),
        ("federation", "server-optimizer"),
    }
    for section, key in ADDED_KEYS:
        del old[section][key]
    assert config_from_dict(old) == config
    assert config.federation.server_learning_rate == 1.0
    assert config.training.pretrain_ema_decay == 0.0
    assert config.training.finetune_optimizer == "adamw"
    assert config.federation.server_optimizer == "sgd"
    full = write(tmp_path, yaml.safe_dump(old))
    assert load_config(full) == config
    assert (
        config_hash(config)
        == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    )  # what config_hash gave before the key existed
    faster = load_config("tiny", {"federation.server-learning-rate": 2})
    assert config_hash(faster) != config_hash(config)
    assert config_from_dict(to_dict(faster)) == faster
    averaged = load_config("tiny", {"training.pretrain-ema-decay": 0.995})
    assert pretraining_hash(averaged) != pretraining_hash(config)
    assert pretraining_hash(faster) == pretraining_hash(config)  # federation: not pretraining
    plain_sgd = load_config("tiny", {"training.finetune-optimizer": "sgd"})
    assert config_hash(plain_sgd) != config_hash(config)
    assert pretraining_hash(plain_sgd) == pretraining_hash(config)  # finetuning only
    cosine = load_config("tiny", {"training.pretrain-schedule": "cosine"})
    assert pretraining_hash(cosine) != pretraining_hash(config)
    warm = load_config("tiny", {"training.pretrain-warmup-steps": 5})
    assert pretraining_hash(warm) != pretraining_hash(config)
    kept = load_config("tiny")  # the presets keep the moments
    assert kept.training.finetune_optimizer_state == "keep"
    assert config_hash(kept) != config_hash(config)
    assert pretraining_hash(kept) == pretraining_hash(config)


def test_user_file_with_base_overrides_only_what_it_lists(tmp_path):
    path = write(tmp_path, "base: tiny\nprivacy:\n  target-epsilon: 2.5\n  delta: 1e-6\n")
    config = load_config(path)
    assert config.privacy.target_epsilon == 2.5
    assert config.privacy.delta == pytest.approx(1e-6)  # YAML reads 1e-6 as a string
    assert config.data.shape == (32, 32, 8)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"privacy.target-epsilon": -1}, "privacy.target-epsilon = -1: must be > 0"),
        ({"privacy.target-epsilon": "ten"}, 'privacy.target-epsilon = "ten": must be a number'),
        ({"privacy.delta": 1.5}, "privacy.delta = 1.5: must be in (0, 1)"),
        ({"privacy.accountant": "gdp"}, 'privacy.accountant = "gdp": must be one of rdp, prv'),
        ({"privacy.sample-rate": 0.1}, "set exactly one of batch-size and sample-rate"),
        ({"federation.rounds": 2.5}, "federation.rounds = 2.5: must be an integer"),
        ({"federation.secure-aggregation": 1}, "must be true or false"),
        (
            {"federation.server-optimizer": "adam", "federation.server-learning-rate": 0.5},
            "must be below 0.1 with server-optimizer adam",
        ),
        ({"federation.server-optimizer": "fedyogi"}, "must be one of sgd, adam"),
        ({"federation.server-learning-rate": 0}, "server-learning-rate = 0: must be > 0"),
        ({"training.pretrain-ema-decay": 1}, "pretrain-ema-decay = 1: must be in [0, 1)"),
        (
            {"training.pretrain-warmup-steps": 3000},
            "training.pretrain-warmup-steps = 3000: must be below pretrain-steps (3000)",
        ),
        ({"training.pretrain-schedule": "step"}, "must be one of constant, cosine"),
        ({"federation.sites-per-round": 9}, "federation.sites-per-round = 9: must be <= sites (3)"),
        ({"unet.attention-levels": "[true]"}, "must have one entry per channels level (3)"),
        ({"unet.num-head-channels": 7}, "must divide channels at attention levels"),
        (
            {"data.shape": "[31, 32, 8]"},
            "data.shape = [31, 32, 8]: in-plane size must be divisible by 2",
        ),
        ({"data.shape": "[32, 32]"}, "data.shape = [32, 32]: must be a list of 3 values"),
        ({"data.intensity-percentiles": "[99, 1]"}, "lower must be below upper"),
        ({"diffusion.beta-end": 0.001}, "must be greater than beta-start"),
        ({"sampling.steps": 5000}, "must be <= diffusion.train-timesteps"),
        ({"device": "tpu"}, 'device = "tpu": must be one of auto, cpu, cuda'),
        (
            {"privacy.target-epsilonn": 1},
            "privacy.target-epsilonn: unknown key (did you mean 'target-epsilon'?)",
        ),
        ({"nosuch.key": 1}, "nosuch.key: unknown key"),
        ({"privacy.delta.x": 1}, "cannot override inside privacy.delta"),
    ],
)
def test_bad_override_names_key_value_and_rule(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("default", overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("base: default\nprivacy:\n  epsilon: 3\n", "privacy.epsilon: unknown key"),
        ("base: default\nextra: 1\n", "config key extra: unknown key"),
        ("seed: 0\n", "config key device: missing"),
        ("base: default\nprivacy: 3\n", "config key privacy = 3: must be a mapping"),
        ("base: default\nprivacy:\n  delta: [1\n", "line 4"),
        ("- a\n- b\n", "top level must be a mapping"),
        (
            "base: default\ndata:\n  attributes:\n"
            "    - {name: lvef, unit: '%', min: 80, max: 10, discrete: false}\n",
            "data.attributes[0].max = 10: must be greater than min (80.0)",
        ),
        (
            "base: default\ndata:\n  attributes:\n"
            "    - {name: LV EF, unit: '%', min: 1, max: 10, discrete: false}\n",
            "data.attributes[0].name",
        ),
        (
            "base: default\ndata:\n  attributes:\n"
            "    - {name: a, unit: '', min: 0, max: 1, discrete: false}\n"
            "    - {name: a, unit: '', min: 0, max: 1, discrete: false}\n",
            "duplicate names ['a']",
        ),
        ("base: nosuchpreset\n", "no preset of that name"),
    ],
)
def test_bad_file_names_the_problem(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert message in str(err.value)


def test_base_chain_loop_is_refused(tmp_path):
    write(tmp_path, "base: b.yaml\n", "a.yaml")
    write(tmp_path, "base: a.yaml\n", "b.yaml")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "a.yaml")


def test_missing_source_lists_presets():
    with pytest.raises(ConfigError, match=r"presets: default, large, tiny"):
        load_config("/no/such/file.yaml")


def test_string_overrides_from_command_line_are_typed():
    overrides = parse_assignments(
        [
            "privacy.delta=1e-6",
            "data.shape=[32,32,8]",
            "privacy.batch-size=null",
            "privacy.sample-rate=0.05",
            "federation.secure-aggregation=false",
        ]
    )
    config = load_config("default", overrides)
    assert config.privacy.delta == pytest.approx(1e-6)
    assert config.data.shape == (32, 32, 8)
    assert config.privacy.batch_size is None and config.privacy.sample_rate == 0.05
    assert config.federation.secure_aggregation is False
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_assignments(["privacy.delta"])


def test_cli_reports_bad_config_in_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "fedsynth.common.cli", "config", "-c", "privacy.delta=2"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "fedsynth config: error: config key privacy.delta = 2: must be in (0, 1)"
    )
