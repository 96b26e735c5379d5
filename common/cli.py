"""The `fedsynth` command: one subcommand per task, errors as one clear line.

Each subcommand lives in the part of the project it belongs to (a hospital's site check
in common, phantom generation in simulations, ...) and is named here by module path, so
that common stays free of imports from the other parts. A command module provides
`HELP` (one line), `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

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


class Parser(argparse.ArgumentParser):
    """argparse without prefix matching (`--site` is not `--sites`), which reports an
    option it does not know before the options it misses (`--outt` is not "--out
    required"). Subcommand parsers are made by this class too."""

    _NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self._argv: list[str] = []

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        if message.startswith("the following arguments are required"):
            unknown = self._unknown_options()
            if unknown:
                message = f"unrecognized arguments: {' '.join(unknown)}"
        super().error(message)

    def _unknown_options(self) -> list[str]:
        tokens = self._argv[: self._argv.index("--")] if "--" in self._argv else self._argv
        return [
            token
            for token in tokens
            if token.startswith("-")
            and not self._NUMBER.match(token)
            and token.split("=", 1)[0] not in self._option_string_actions
        ]


class _JsonFormat(argparse.Action):
    def __call__(self, parser: Any, namespace: Any, value: Any, option: Any = None) -> None:
        namespace.json = value == "json"


def add_json_arguments(parser: argparse.ArgumentParser, help: str) -> None:
    """`--json` and its spelling in Flower's CLI, `--format json`; both set `args.json`."""
    parser.add_argument("--json", action="store_true", help=help)
    parser.add_argument(
        "--format", choices=("text", "json"), action=_JsonFormat, help="json: as --json"
    )


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
    parser = Parser(
        prog="fedsynth",
        description="Federated, differentially private synthesis of 3D cardiac MRI cohorts.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
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
        _name_parsers(cmd)
    return parser


def _version() -> str:
    try:
        return importlib.metadata.version("fedsynth")
    except importlib.metadata.PackageNotFoundError:  # run from a tree that is not installed
        return "(not installed)"


def _name_parsers(parser: argparse.ArgumentParser) -> None:
    """Each (sub)command's parser as `args._parser`, to name an argument in an error."""
    parser.set_defaults(_parser=parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _name_parsers(child)


def _argument_for(args: argparse.Namespace, filename: object) -> str:
    """The option whose path value the failed file is, lies under or lies above (a parent
    that could not be made), e.g. "--out /tmp/x"; empty when none is."""
    if not isinstance(filename, str | bytes | os.PathLike):
        return ""
    failed = Path(os.fsdecode(filename)).absolute()
    best: tuple[int, str] = (0, "")
    parser = getattr(args, "_parser", None)
    for action in parser._actions if parser else []:
        values = getattr(args, action.dest, None)
        for value in values if isinstance(values, list) else [values]:
            if not isinstance(value, str | Path) or not action.option_strings:
                continue
            given = Path(value).expanduser().absolute()
            related = failed == given or given in failed.parents or failed in given.parents
            if related and len(str(given)) > best[0]:
                best = (len(str(given)), f"{action.option_strings[-1]} {value}")
    return best[1]


def _os_error_line(args: argparse.Namespace, exc: OSError) -> str:
    reason = (exc.strerror or type(exc).__name__).lower()
    if isinstance(exc, FileExistsError):  # mkdir over a file
        reason = "exists and is not a folder"
    where = f" ({exc.filename})" if exc.filename else ""
    named = _argument_for(args, exc.filename)
    return f"{named}: {reason}{where}" if named else f"{reason}{where}"


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
    except UnicodeDecodeError as exc:  # a file read as text that is not UTF-8
        print(f"fedsynth {args.command}: error: a file is not UTF-8 text ({exc})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fedsynth {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `fedsynth ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # as the Python docs do
        return 1
    except OSError as exc:  # a path the command was given: a file for a folder, no access
        print(f"fedsynth {args.command}: error: {_os_error_line(args, exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
