"""`fedsynth config`: check a config (file or preset, plus overrides) and print it resolved."""

from __future__ import annotations

import argparse

from fedsynth.common.cli import add_config_arguments, config_from_args

HELP = "Check a config file or preset (with key=value overrides) and print it fully resolved."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from fedsynth.common.config import config_hash, to_yaml

    config = config_from_args(args)
    print(f"# config hash {config_hash(config)}")
    print(to_yaml(config), end="")
    return 0
