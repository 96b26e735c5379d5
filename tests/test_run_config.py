"""`flwr run` run config: declared overrides, reserved keys and the pretraining cache key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict, fuse_dicts, parse_config_args

from fedsynth.common.config import config_hash, load_config, pretraining_hash, to_dict
from fedsynth.common.errors import FedsynthError
from fedsynth.server.study import RESERVED, config_overrides, prepare

ROOT = Path(__file__).resolve().parents[1]


def declared() -> dict:
    """The run config as Flower builds it from pyproject.toml (flattened, dotted keys)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return flatten_dict(pyproject["tool"]["flwr"]["app"]["config"])


def _lookup(config_dict: dict, dotted: str):
    value = config_dict
    for part in dotted.split("."):
        value = value[part]
    return value


def test_every_declared_override_is_a_config_key_and_unset_by_default():
    overridable = {k: v for k, v in declared().items() if k not in RESERVED}
    assert "privacy.target-epsilon" in overridable and "federation.rounds" in overridable
    assert all(v == "" for v in overridable.values()), "a declared default would mask the file"
    assert config_overrides(declared()) == {}
    default = to_dict(load_config("default"))
    for key in overridable:
        value = _lookup(default, key)
        # each key is accepted (the value of the default preset round-trips)
        assert to_dict(load_config("default", {key: value})) == default, key


def test_an_override_from_the_command_line_reaches_the_config():
    # what `flwr run . -c 'privacy.target-epsilon=5 federation.rounds=3'` gives the ServerApp
    fused = fuse_dicts(
        declared(), parse_config_args(["privacy.target-epsilon=5 federation.rounds=3"])
    )
    config = load_config("tiny", config_overrides(fused))
    assert config.privacy.target_epsilon == 5.0 and config.federation.rounds == 3
    # unset keys keep the preset's own values (tiny has 2 rounds, default 5)
    assert load_config("tiny", config_overrides(declared())).federation.rounds == 2
    with pytest.raises(ValueError, match="not present"):
        fuse_dicts(declared(), parse_config_args(["privacy.nonsense=1"]))


def test_pretraining_cache_key_ignores_privacy_and_federation():
    base = load_config("tiny")
    same = load_config("tiny", {"privacy.target-epsilon": 3, "federation.rounds": 7})
    assert config_hash(same) != config_hash(base)
    assert pretraining_hash(same) == pretraining_hash(base)
    for key, value in (("unet.token-dim", 16), ("training.pretrain-steps", 3), ("seed", 4)):
        assert pretraining_hash(load_config("tiny", {key: value})) != pretraining_hash(base), key


def test_prepare_with_a_public_checkpoint_generates_nothing(tmp_path, tiny_checkpoint):
    run_config = declared() | {
        "config": "tiny",
        "data": "sites",
        "run-dir": str(tmp_path / "run"),
        "checkpoint": str(tiny_checkpoint),
        "paths.cache-dir": str(tmp_path / "c"),
    }
    study = prepare(run_config)
    assert study.checkpoint == tiny_checkpoint.resolve() and study.phantoms is None
    assert study.validation is None and not (tmp_path / "c").exists()
    with pytest.raises(FedsynthError, match="validation-data='/nowhere': no such folder"):
        prepare({**run_config, "validation-data": "/nowhere"})


@pytest.mark.parametrize(
    ("data", "checkpoint", "says"),
    [
        ("sites", False, 'data="sites" and checkpoint is empty: name the public checkpoint'),
        ("phantoms", True, r'data is "phantoms" \(a simulation pretrains its own\): add'),
        ("hospital", True, 'data=\'hospital\': must be "phantoms" .* or "sites"'),
    ],
    ids=["sites-without-checkpoint", "phantoms-with-checkpoint", "unknown"],
)
def test_data_and_checkpoint_are_checked_together_before_anything_is_made(
    tmp_path, tiny_checkpoint, data, checkpoint, says
):
    """pyproject's `data = "phantoms"` runs the simulation; a study with real sites says
    `data="sites"` and names its checkpoint: each half alone is one line, and nothing of
    the simulation is generated or imported for it."""
    run_config = declared() | {
        "config": "tiny",
        "data": data,
        "run-dir": str(tmp_path / "run"),
        "checkpoint": str(tiny_checkpoint) if checkpoint else "",
        "paths.cache-dir": str(tmp_path / "cache"),
    }
    assert declared()["data"] == "phantoms"
    with pytest.raises(FedsynthError, match=says):
        prepare(run_config)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_phantom_site_size_has_one_default():
    """`flwr run .` and `fedsynth study` simulate sites of the same size by default."""
    from fedsynth.server.study import DEFAULT_PHANTOM_SUBJECTS, DEFAULT_PUBLIC_SUBJECTS
    from fedsynth.simulations.arms import StudySetup

    assert declared()["phantom-subjects"] == DEFAULT_PHANTOM_SUBJECTS
    assert declared()["phantom-public-subjects"] == DEFAULT_PUBLIC_SUBJECTS
    setup = StudySetup(load_config("tiny"))
    assert (setup.subjects, setup.public_subjects) == (
        DEFAULT_PHANTOM_SUBJECTS,
        DEFAULT_PUBLIC_SUBJECTS,
    )


@pytest.mark.parametrize("value", ["1", "many", "2.5", -3])
@pytest.mark.parametrize("key", ["phantom-subjects", "phantom-public-subjects"])
def test_a_bad_phantom_count_is_one_line_before_anything_is_made(tmp_path, key, value):
    run_dir = tmp_path / "run"
    with pytest.raises(FedsynthError, match=f"run config {key}=.*whole number of at least 2"):
        prepare({"config": "tiny", "run-dir": str(run_dir), key: value})
    assert not run_dir.exists()


def test_a_public_set_of_another_size_is_generated_into_its_own_folder(tmp_path):
    import csv

    from fedsynth.server.study import DEFAULT_PUBLIC_SUBJECTS
    from fedsynth.simulations.study_data import phantom_folder

    folder = phantom_folder(tmp_path, load_config("tiny"), 2, public_subjects=3)
    assert folder.name == "sites3-subjects2-seed0-public3"
    with open(folder / "public" / "manifest.csv") as f:
        subjects = {row["subject"] for row in csv.DictReader(f)}
    assert len(subjects) == 3
    # the default size is named too: phantoms cached when the default was another size
    # (the same folder name once held 40) are never taken for the default's
    old_default = folder.with_name("sites3-subjects2-seed0")
    (old_default / "site-3").mkdir(parents=True)
    (old_default / "site-3" / "manifest.csv").write_text("subject\n")
    expected = folder.with_name(f"sites3-subjects2-seed0-public{DEFAULT_PUBLIC_SUBJECTS}")
    (expected / "site-3").mkdir(parents=True)
    (expected / "site-3" / "manifest.csv").write_text("subject\n")  # cached: not generated
    assert phantom_folder(tmp_path, load_config("tiny"), 2) == expected
