"""`fedsynth bench`: measured speed and memory ratios as JSON."""

from __future__ import annotations

import argparse
import json

from fedsynth.common.cli import add_config_arguments, config_from_args

HELP = "Measure speed/memory ratios (e.g. ddim_speedup_over_ddpm) in one run; prints JSON."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--only", metavar="KEY", help="measure one key only")
    parser.add_argument(
        "--site-subjects",
        type=int,
        default=None,
        metavar="N",
        help="subjects per measured site (default: as `flwr run .` simulates them)",
    )
    parser.add_argument(
        "--device-report",
        action="store_true",
        help="instead of the ratios: seconds and MiB of a site's DP step and of sampling on "
        "this machine's device, at the config's size and at the paper's 96x96x13",
    )
    parser.add_argument("--json", action="store_true", help="print JSON (the only output form)")


def run(args: argparse.Namespace) -> int:
    import sys

    from fedsynth.common.errors import FedsynthError
    from fedsynth.simulations.bench import MEASURES, Bench

    if args.only is not None and args.only not in MEASURES:
        raise FedsynthError(f"unknown bench key {args.only!r} (known: {', '.join(MEASURES)})")
    if args.site_subjects is not None and args.site_subjects < 2:
        raise FedsynthError(f"--site-subjects must be at least 2, got {args.site_subjects}")
    if args.device_report and args.only is not None:
        raise FedsynthError("--device-report measures its own figures; leave out --only")
    config = config_from_args(args)
    bench = Bench(config) if args.site_subjects is None else Bench(config, args.site_subjects)
    if args.device_report:
        from fedsynth.simulations.device_report import device_report

        print("bench: measuring the device report ...", file=sys.stderr, flush=True)
        print(json.dumps(device_report(bench), indent=2))
        return 0
    keys = [args.only] if args.only else list(MEASURES)
    results = {}
    for key in keys:
        print(f"bench: measuring {key} ...", file=sys.stderr, flush=True)
        results[key] = round(MEASURES[key](bench), 3)
    print(json.dumps(results, indent=2))
    return 0
