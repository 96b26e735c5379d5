"""A site's settings come from its node config; simulated nodes get safe defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsynth.client.node_config import site_settings
from fedsynth.client.public_size import MaxDeltaAboveCount, PublicSizeAboveCount, subject_count
from fedsynth.common.errors import FedsynthError

HOSPITAL = {"data-path": "/d", "state-dir": "/s", "site-name": "a", "max-epsilon": 5}


def test_a_hospital_node_config_is_taken_as_given():
    settings = site_settings(
        {
            "data-path": "/data/cardiac",
            "state-dir": "/var/fedsynth",
            "max-epsilon": "4.5",
            "site-name": "hospital-a",
        },
        target_epsilon=10.0,
    )
    assert settings.data_path == Path("/data/cardiac")
    assert settings.state_dir == Path("/var/fedsynth")
    assert settings.max_epsilon == 4.5 and settings.name == "hospital-a"
    # its subject count is published rounded unless it says otherwise
    assert settings.public_subjects is None and not settings.disclose_subject_count


def test_a_simulated_node_is_its_phantom_site_with_state_in_the_run(tmp_path):
    settings = site_settings(
        {"partition-id": 2, "num-partitions": 3},
        target_epsilon=8.0,
        simulation_data=tmp_path / "phantoms",
        simulation_state=tmp_path / "run" / "sites",
    )
    assert settings.name == "site-3"
    assert settings.data_path == tmp_path / "phantoms" / "site-3"
    assert settings.state_dir == tmp_path / "run" / "sites" / "site-3"
    assert settings.max_epsilon == 8.0  # no site ceiling given: the study's target


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        ({"state-dir": "/s"}, "node config lacks data-path"),
        ({"data-path": "/d", "state-dir": " "}, "node config lacks state-dir"),
        ({"data-path": "/d", "state-dir": "/s", "max-epsilon": 5}, "node config lacks site-name"),
        ({"data-path": "/d", "state-dir": "/s", "site-name": "a"}, "node config lacks max-epsilon"),
        (
            {"data-path": "/d", "state-dir": "/s", "site-name": "a", "max-epsilon": "lots"},
            "'lots': not a number",
        ),
        (
            {"data-path": "/d", "state-dir": "/s", "site-name": "a", "max-epsilon": 0},
            "must be a positive number",
        ),
        (
            {
                "data-path": "/d",
                "state-dir": "/s",
                "site-name": "a",
                "max-epsilon": 5,
                "max-delta": 1.5,
            },
            "max-delta=1.5: must be below 1",
        ),
        (
            {
                "data-path": "/d",
                "state-dir": "/s",
                "site-name": "a",
                "max-epsilon": 5,
                "require-secure-aggregation": "maybe",
            },
            "must be true or false",
        ),
        (
            {
                "data-path": "/d",
                "state-dir": "/s",
                "site-name": "a",
                "max-epsilon": 5,
                "accountant": "gdp",
            },
            "accountant='gdp': one of rdp, prv",
        ),
        ({"partition-id": 0}, "a simulated node needs the phantom and run folders"),
        (
            {**HOSPITAL, "public-subjects": "300.5"},
            "public-subjects='300.5': must be a whole number of at least 1",
        ),
        ({**HOSPITAL, "public-subjects": 0}, "public-subjects=0: must be a whole number"),
        ({**HOSPITAL, "public-subjects": 120}, "sets public-subjects without max-delta"),
        ({**HOSPITAL, "public-subjects": True}, "public-subjects=True: must be a whole number"),
        ({**HOSPITAL, "disclose-subject-count": "perhaps"}, "must be true or false"),
        (
            {**HOSPITAL, "public-subjects": 300, "disclose-subject-count": "true"},
            "sets both public-subjects and disclose-subject-count=true",
        ),
    ],
)
def test_bad_node_configs_are_one_clear_line(node_config, message):
    with pytest.raises(FedsynthError, match=message):
        site_settings(node_config, target_epsilon=10.0)


@pytest.mark.parametrize(
    ("terms", "subjects", "public", "bound"),
    [
        ({}, 300, 300, 309),
        ({}, 347, 340, 349),
        ({}, 1234, 1200, 1299),
        ({}, 45, 40, 49),
        ({}, 10, 10, 19),
        ({}, 99, 90, 99),
        ({}, 100, 100, 109),
        ({}, 9, 1, 9),  # below 10 subjects: 1 (q = batch / 1, at most 1)
        ({}, 1, 1, 9),
        # declared: delta is checked against max-delta < 1/n alone (bound n, never reached)
        ({"public-subjects": "250", "max-delta": 1e-3}, 347, 250, 347),
        ({"public-subjects": 347, "max-delta": 1e-3}, 347, 347, 347),
        ({"disclose-subject-count": "true"}, 347, 347, 347),
        ({"disclose-subject-count": True}, 3, 3, 3),
    ],
)
def test_a_site_publishes_its_count_rounded_declared_or_on_its_opt_in(
    terms, subjects, public, bound
):
    settings = site_settings(HOSPITAL | terms, target_epsilon=10.0)
    count = subject_count(settings, subjects)
    assert (count.real, count.public, count.bound) == (subjects, public, bound)
    assert count.exact == ("disclose-subject-count" in terms)
    assert count.public <= subjects <= count.bound


def test_a_declared_size_above_the_count_is_refused():
    settings = site_settings(
        HOSPITAL | {"public-subjects": 348, "max-delta": 1e-3}, target_epsilon=10.0
    )
    with pytest.raises(PublicSizeAboveCount, match="public-subjects=348 exceeds"):
        subject_count(settings, 347)


def test_a_declared_size_needs_a_max_delta_below_one_over_the_real_count():
    """With public-subjects a study's delta is checked against max-delta alone, so the
    site checks once, for its real n, that max-delta is below 1/n (1/347 = 2.88e-3)."""
    settings = site_settings(
        HOSPITAL | {"public-subjects": 100, "max-delta": 2.9e-3}, target_epsilon=10.0
    )
    with pytest.raises(MaxDeltaAboveCount, match="max-delta below 1/n"):
        subject_count(settings, 347)
    assert subject_count(settings, 344).public == 100  # 2.9e-3 < 1/344


def test_a_simulated_node_publishes_its_phantom_count_rounded(tmp_path):
    """Flower gives a simulated node no node config to opt in with: the default holds
    (a 300-subject phantom site publishes 300, as before)."""
    settings = site_settings(
        {"partition-id": 0, "num-partitions": 3},
        target_epsilon=8.0,
        simulation_data=tmp_path,
        simulation_state=tmp_path,
    )
    assert subject_count(settings, 300).public == 300
    assert subject_count(settings, 347).public == 340
