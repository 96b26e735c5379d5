"""`fedsynth study NAME`: run one study on phantom sites; table on stdout, JSON and PNG saved."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from fedsynth.common.cli import add_config_arguments, add_json_arguments, config_from_args

HELP = "Run a study on phantom sites (docs/results.md): dp-gap, federation, pretraining, ..."
NAMES = (
    "dp-gap",
    "federation",
    "pretraining",
    "trainable",
    "controllability",
    "scale",
    "downstream",
    "levers",
    "dp-audit",
    "signal",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=NAMES, help="which study")
    add_config_arguments(parser)
    parser.add_argument(
        "--subjects",
        type=int,
        default=None,
        metavar="N",
        help="subjects per phantom site (default: as `flwr run .`)",
    )
    parser.add_argument(
        "--public-subjects",
        type=int,
        default=None,
        metavar="M",
        help="public phantom subjects the checkpoint is pretrained on (default: as `flwr run .`)",
    )
    parser.add_argument(
        "--seeds", type=int, default=1, metavar="K", help="repeat with seeds 0..K-1 (1)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("studies"),
        metavar="DIR",
        help="where NAME.json and NAME.png go, and dp-gap's montages (./studies)",
    )
    parser.add_argument(
        "--canaries",
        type=int,
        default=None,
        metavar="M",
        help="dp-audit: canary subjects at the first site, each trained on with probability "
        "1/2 (256)",
    )
    parser.add_argument(
        "--no-noise",
        action="store_true",
        help="dp-audit only: train with noise multiplier 0, to calibrate the audit (it must "
        "then find more than the claimed epsilon); never a way to train",
    )
    add_json_arguments(parser, "print the JSON, not the table")


def run(args: argparse.Namespace) -> int:
    from fedsynth.common.errors import FedsynthError
    from fedsynth.common.io import atomic_write_text
    from fedsynth.server.study import DEFAULT_PHANTOM_SUBJECTS, DEFAULT_PUBLIC_SUBJECTS
    from fedsynth.simulations import studies
    from fedsynth.simulations.arms import StudySetup
    from fedsynth.simulations.canaries import AuditPlan
    from fedsynth.simulations.study_views import VIEWS

    if args.seeds < 1:
        raise FedsynthError(f"--seeds must be at least 1, got {args.seeds}")
    subjects = DEFAULT_PHANTOM_SUBJECTS if args.subjects is None else args.subjects
    public = DEFAULT_PUBLIC_SUBJECTS if args.public_subjects is None else args.public_subjects
    for flag, value in (("--subjects", subjects), ("--public-subjects", public)):
        if value < 2:
            raise FedsynthError(f"{flag} must be at least 2, got {value}")
    if args.name != "dp-audit" and (args.canaries is not None or args.no_noise):
        raise FedsynthError("--canaries and --no-noise are for the dp-audit study only")
    audit = AuditPlan() if args.canaries is None else _audit_plan(args.canaries)
    args.out.mkdir(parents=True, exist_ok=True)
    setup = StudySetup(
        config_from_args(args),
        subjects,
        tuple(range(args.seeds)),
        public,
        figures=args.out,
        audit=dataclasses.replace(audit, no_noise=args.no_noise),
    )
    result = studies.STUDIES[args.name](setup)
    table, plot = VIEWS[args.name]
    atomic_write_text(args.out / f"{args.name}.json", json.dumps(result, indent=2) + "\n")
    plot(result, args.out / f"{args.name}.png")
    print(json.dumps(result, indent=2) if args.json else table(result))
    written = ", ".join([f"{args.name}.json", f"{args.name}.png", *result.get("montages", [])])
    print(f"study {args.name}: {result['seconds']:.0f} s; wrote {written} in {args.out}")
    return 0


def _audit_plan(canaries: int):
    """An AuditPlan of `canaries`, with a bad count as one line naming --canaries."""
    from fedsynth.common.errors import FedsynthError
    from fedsynth.simulations.canaries import AuditPlan

    try:
        return AuditPlan(canaries=canaries)
    except ValueError as error:
        raise FedsynthError(f"--canaries: {error}") from None
