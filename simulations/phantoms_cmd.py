"""`fedsynth phantoms`: write public and site phantom cohorts (light imports for a fast --help)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

HELP = "Generate phantom cardiac MRI cohorts: DIR/public and DIR/site-1..K (NIfTI + manifest.csv)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the phantoms subcommand."""
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    parser.add_argument("--sites", type=int, default=3, metavar="K", help="number of sites (3)")
    parser.add_argument(
        "--subjects", type=int, default=20, metavar="N", help="subjects per site (20)"
    )
    parser.add_argument(
        "--public-subjects", type=int, default=None, metavar="M", help="public subjects (2*N)"
    )
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (0)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Generate the cohorts and print one summary line."""
    from fedsynth.simulations.phantoms import generate_cohorts

    start = time.perf_counter()
    manifests = generate_cohorts(
        args.out,
        sites=args.sites,
        subjects=args.subjects,
        seed=args.seed,
        public_subjects=args.public_subjects,
        progress=not args.quiet,
    )
    public = 2 * args.subjects if args.public_subjects is None else args.public_subjects
    print(
        f"wrote {len(manifests) - 1} sites x {args.subjects} subjects + {public} public "
        f"(ED and ES each) to {args.out} in {time.perf_counter() - start:.1f} s; "
        f"montage: {args.out / 'montage.png'}"
    )
    return 0
