"""`fedsynth site-check`: tells a hospital, before it joins, which rows are usable and why not."""

from __future__ import annotations

import argparse
import json

from fedsynth.common.cli import add_config_arguments, add_json_arguments, config_from_args

HELP = "Check a site's data folder (manifest.csv + NIfTI) before joining a study; reads only."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-path", required=True, metavar="DIR", help="the site's data folder")
    add_config_arguments(parser)
    add_json_arguments(parser, "print the result as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--strict", action="store_true", help="reject rows with warnings instead of listing them"
    )


def run(args: argparse.Namespace) -> int:
    from fedsynth.common.data import MANIFEST, check_site
    from fedsynth.common.errors import FedsynthError

    config = config_from_args(args)
    result = check_site(
        args.data_path,
        config.data,
        show_progress=not (args.quiet or args.json),
        strict=args.strict,
    )
    subjects = len(result.subjects())
    if config.privacy.enabled and subjects and config.privacy.delta >= 1 / subjects:
        result.site_warnings.append(
            f"privacy.delta {config.privacy.delta:g} is not below 1/{subjects} subjects: "
            "this site cannot train under this config"
        )
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(
            f"{result.root}: {len(result.records)} usable rows, "
            f"{len(result.subjects())} subjects, {len(result.rejected)} rejected"
        )
        for r in result.rejected:
            print(f"  row {r.row} ({r.file or 'no file'}): {r.reason}")
        for w in result.warnings:
            print(f"  warning: row {w.row} ({w.file}): {w.reason}")
        for warning in result.site_warnings:
            print(f"  warning: {warning}")
    if not result.records:
        raise FedsynthError(f"no usable rows in {result.root / MANIFEST}")
    return 0
