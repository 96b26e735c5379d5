"""A site's settings come from its node config; simulated nodes get safe defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsynth.client.node_config import site_settings
from fedsynth.common.errors import FedsynthError


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
    ],
)
def test_bad_node_configs_are_one_clear_line(node_config, message):
    with pytest.raises(FedsynthError, match=message):
        site_settings(node_config, target_epsilon=10.0)
