"""The `fedsynth` command: one subcommand per task, errors as one clear line.

Each subcommand lives in the part of the project it belongs to (a hospital's site check
in common, phantom generation in simulations, ...) and is named here by module path, so
that common stays free of imports from the other parts. A command module provides
`HELP` (one line), `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from fedsynth.common.config import Config, load_config, parse_assignments
from fedsynth.common.errors import FedsynthError
from fedsynth.common.logs import show_on_console

COMMANDS: dict[str, str] = {
    "phantoms": "fedsynth.simulations.phantoms_cmd",
    "site-check": "fedsynth.common.site_check_cmd",
    "import": "fedsynth.client.import_cmd",
    "config": "fedsynth.common.config_cmd",
    "pretrain": "fedsynth.server.pretrain_cmd",
    "bench": "fedsynth.simulations.bench_cmd",
    "study": "fedsynth.simulations.study_cmd",
    "sample": "fedsynth.common.sample_cmd",
    "privacy": "fedsynth.common.privacy_cmd",
    "evaluate": "fedsynth.common.evaluate_cmd",
    "audit": "fedsynth.client.audit_cmd",
    "release": "fedsynth.server.release_cmd",
    "unbind-site": "fedsynth.server.unbind_site_cmd",
}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config` (path or preset) and repeatable `-c key=value` overrides."""
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
        help="override a config key, e.g. -c privacy.target-epsilon=5 (repeatable)",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    """The config named by `add_config_arguments`' options, checked once."""
    return load_config(args.config, parse_assignments(args.overrides))


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="fedsynth",
        description="Federated, differentially private synthesis of 3D cardiac MRI cohorts.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_path in COMMANDS.items():
        try:
            module = importlib.import_module(module_path)
        except ModuleNotFoundError as err:  # a part not installed: a site image has no server
            if not module_path.startswith(f"{err.name}."):
                raise
            continue
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    show_on_console()  # what the command's library parts log, on stderr
    try:
        return int(args._run(args) or 0)
    except FedsynthError as exc:
        print(f"fedsynth {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fedsynth {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `fedsynth ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # as the Python docs do
        return 1


if __name__ == "__main__":
    sys.exit(main())
