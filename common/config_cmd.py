"""`fedsynth config`: check a config (file or preset, plus overrides) and print it resolved."""

from __future__ import annotations

import argparse

HELP = "Check a config file or preset (with key=value overrides) and print it fully resolved."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default="default", metavar="FILE", help="YAML path or preset name (default)"
    )
    parser.add_argument(
        "-c",
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key, e.g. -c privacy.target-epsilon=5 (repeatable)",
    )


def run(args: argparse.Namespace) -> int:
    from fedsynth.common.config import config_hash, load_config, parse_assignments, to_yaml

    config = load_config(args.config, parse_assignments(args.overrides))
    print(f"# config hash {config_hash(config)}")
    print(to_yaml(config), end="")
    return 0
