"""`fedsynth release`: a synthetic cohort from a finished study (server/release.py)."""

from __future__ import annotations

import argparse

HELP = (
    "Release a synthetic cohort from a finished study: cohort/ (NIfTI + manifest.csv), "
    "privacy.json, ledger.jsonl and report.html; refuses a study whose ledger does not hold up."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, metavar="DIR", help="the study's run dir")
    parser.add_argument("--n", required=True, type=int, help="number of volumes to generate")
    parser.add_argument(
        "--attributes",
        metavar="CSV",
        help="one row per volume, a column per configured attribute (first N rows); default: "
        "rows drawn from the public checkpoint's attribute table",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) folder")
    parser.add_argument(
        "--reference",
        metavar="DIR",
        help="real data to measure fidelity, diversity and utility against (a site-style "
        "folder); statistics of it are PUBLISHED in the release, computed without DP: give "
        "only data they may be published of (e.g. public held-out volumes), never a site's",
    )
    parser.add_argument(
        "--audit",
        action="append",
        default=[],
        metavar="[SITE=]FILE",
        help="a site's `fedsynth audit --json` output, as FILE or SITE=FILE (repeatable)",
    )
    parser.add_argument("--seed", type=int, metavar="S", help="default: the study config's seed")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: config")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedsynth.server.release import release

    statement = release(
        args.run,
        args.n,
        args.out,
        args.attributes,
        args.reference,
        args.audit,
        args.seed,
        args.device,
        show_progress=not args.quiet,
    )
    out = Path(args.out).expanduser()
    sites = ", ".join(f"{s} {e['epsilon']:.4g}" for s, e in statement["sites"].items())
    print(
        f"released {args.n} synthetic volumes to {out / 'cohort'}: study epsilon "
        f"{statement['study_epsilon']:.4g} at delta {statement['delta']:g} ({sites}); "
        f"report {out / 'report.html'}"
    )
    return 0
