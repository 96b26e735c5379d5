"""`fedsynth bench`: measured speed and memory ratios as JSON.

Each key's value is its median; `figures` holds, per key, the median, the spread (q1, q3,
min, max, and the samples) where it was measured more than once, the repeats and how it
was measured (simulations/bench_timing.py); `hardware` what it ran on, `settings` what
it measured with, `load_average` the machine's load when it began and ended. A command
stopped from outside (SIGTERM, SIGHUP, Ctrl-C) stops the SuperLink and simulation it
started before it exits (non-zero: 128 + the signal; `local_flwr.stopped_on_exit`).
"""

from __future__ import annotations

import argparse
import json

from fedsynth.common.cli import add_config_arguments, add_json_arguments, config_from_args

HELP = "Measure speed/memory ratios (e.g. ddim_speedup_over_ddpm) in one run; prints JSON."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--only",
        metavar="KEY",
        action="append",
        help="measure this key only (repeatable: these keys only)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        metavar="N",
        help="interleaved pairs (or measured rounds) per figure instead of each key's "
        "default (e.g. 9 DP/plain step pairs, 3 pairs of whole studies)",
    )
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
    add_json_arguments(parser, "print JSON (the only output form)")


def run(args: argparse.Namespace) -> int:
    import signal
    import sys

    from fedsynth.simulations.local_flwr import Stopped, stopped_on_exit

    try:
        with stopped_on_exit():  # whatever it started, stopped on every way out
            return _bench(args)
    except Stopped as stopped:
        name = signal.Signals(stopped.signum).name
        print(f"fedsynth bench: stopped by {name}", file=sys.stderr)
        raise


def _bench(args: argparse.Namespace) -> int:
    import sys
    import time
    from dataclasses import replace
    from datetime import UTC, datetime

    from fedsynth.common.errors import FedsynthError
    from fedsynth.common.models import resolve_device
    from fedsynth.simulations.bench import MEASURES, Bench
    from fedsynth.simulations.bench_timing import DIGITS, hardware, load_average

    for key in args.only or []:
        if key not in MEASURES:
            raise FedsynthError(f"unknown bench key {key!r} (known: {', '.join(MEASURES)})")
    if args.site_subjects is not None and args.site_subjects < 2:
        raise FedsynthError(f"--site-subjects must be at least 2, got {args.site_subjects}")
    if args.repeats is not None and args.repeats < 1:
        raise FedsynthError(f"--repeats must be at least 1, got {args.repeats}")
    if args.device_report and args.only is not None:
        raise FedsynthError("--device-report measures its own figures; leave out --only")
    config = config_from_args(args)
    bench = Bench(config) if args.site_subjects is None else Bench(config, args.site_subjects)
    bench = replace(bench, repeats=args.repeats)
    if args.device_report:
        from fedsynth.simulations.device_report import device_report

        print("bench: measuring the device report ...", file=sys.stderr, flush=True)
        print(json.dumps(device_report(bench), indent=2))
        return 0
    keys = list(dict.fromkeys(args.only)) if args.only else list(MEASURES)
    started, load_before = time.monotonic(), load_average()
    figures = {}
    for key in keys:
        print(f"bench: measuring {key} ...", file=sys.stderr, flush=True)
        figures[key] = MEASURES[key](bench)
    results: dict = {key: round(figure.median, DIGITS) for key, figure in figures.items()}
    results["figures"] = {key: figure.as_json() for key, figure in figures.items()}
    results["hardware"] = hardware(resolve_device(config.device))
    results["load_average"] = {"start": load_before, "end": load_average()}
    results["settings"] = {
        "config": args.config,
        "overrides": args.overrides,
        "site_subjects": bench.site_subjects,
        "repeats": args.repeats,
    }
    results["date"] = datetime.now(UTC).date().isoformat()
    results["wall_seconds"] = round(time.monotonic() - started)
    print(json.dumps(results, indent=2))
    return 0
