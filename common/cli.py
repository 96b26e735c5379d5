"""The `fedsynth` command: one subcommand per task, errors as one clear line.

Each subcommand lives in the part of the project it belongs to (a hospital's site check
in common, phantom generation in simulations, ...) and is named here by module path, so
that common stays free of imports from the other parts. A command module provides
`HELP` (one line), `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from fedsynth.common.errors import FedsynthError

COMMANDS: dict[str, str] = {
    "phantoms": "fedsynth.simulations.phantoms_cmd",
    "site-check": "fedsynth.common.site_check_cmd",
    "config": "fedsynth.common.config_cmd",
    "pretrain": "fedsynth.server.pretrain_cmd",
    "bench": "fedsynth.simulations.bench_cmd",
    "sample": "fedsynth.common.sample_cmd",
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="fedsynth",
        description="Federated, differentially private synthesis of 3D cardiac MRI cohorts.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_path in COMMANDS.items():
        module = importlib.import_module(module_path)
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except FedsynthError as exc:
        print(f"fedsynth {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fedsynth {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
