"""`fedsynth import`: a hospital's cine MRI, as its dataset or scanner export lays it out,
written as a site folder that `fedsynth site-check` reads. Runs at the site; nothing it
reads or computes leaves the site folder it writes (0600 files, 0700 folders)."""

from __future__ import annotations

import argparse

from fedsynth.common.cli import add_config_arguments, config_from_args

HELP = (
    "Import ACDC, M&Ms, UK Biobank-style or dcm2niix cine data into a site folder "
    "(manifest.csv + one 3D NIfTI per phase); runs at the site."
)
EXIT_SKIPPED = 2  # some subjects were skipped; the others are in the site folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--layout",
        required=True,
        choices=("acdc", "mnms", "ukbb", "cine"),
        help="the data's layout",
    )
    parser.add_argument(
        "--source",
        required=True,
        metavar="DIR",
        help="the dataset's folder as downloaded or exported (cine: the CSV listing the files, "
        "or the folder holding it as cine.csv)",
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="SITE_DIR",
        help="the site folder to write: new, empty, or a previous import (replaced)",
    )
    parser.add_argument(
        "--records",
        metavar="CSV",
        help="what the dataset lacks, by its subject id: subject, age, sex (M/F or 1/0), "
        "height (cm), weight (kg), bmi, or any configured attribute",
    )
    parser.add_argument(
        "--label-values",
        metavar="LV,MYO,RV",
        help="cine only: the label values of LV blood pool, LV myocardium and RV blood pool "
        "in its label files (default 3,2,1; UK Biobank and M&Ms style: 1,2,3)",
    )
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedsynth.client.importers.layout import Options
    from fedsynth.client.importers.run import import_site
    from fedsynth.common.errors import FedsynthError

    options = Options(label_values=_label_values(args.label_values, args.layout))
    config = config_from_args(args)
    records = Path(args.records).expanduser() if args.records else None
    if records is not None and not records.is_file():
        raise FedsynthError(f"--records {records} is not a file")
    outcome = import_site(
        args.layout, Path(args.source), Path(args.out), config.data, records, options
    )
    for subject, reason in outcome.skipped:
        print(f"skipped {subject}: {reason}")
    for subject, note in outcome.warnings:
        print(f"warning {subject}: {note} (site-check warns too)")
    if outcome.unmatched:
        shown = ", ".join(outcome.unmatched[:5]) + (", ..." if len(outcome.unmatched) > 5 else "")
        print(
            f"warning: --records lists {len(outcome.unmatched)} subject(s) not in --source "
            f"({shown}): a typo in an id, or a subject missing from the source?"
        )
    if not outcome.imported:
        raise FedsynthError(
            f"no subject of --source {args.source} could be imported; nothing written"
        )
    print(
        f"{outcome.out}: {len(outcome.imported)} subjects imported "
        f"({2 * len(outcome.imported)} rows), {len(outcome.skipped)} skipped; "
        f"next: fedsynth site-check --data-path {outcome.out}"
    )
    return EXIT_SKIPPED if outcome.skipped else 0


def _label_values(text: str | None, layout: str) -> tuple[int, int, int] | None:
    """--label-values as (LV, myocardium, RV); only the cine layout takes it."""
    from fedsynth.common.errors import FedsynthError

    if text is None:
        return None
    if layout != "cine":
        raise FedsynthError(f"--label-values is for --layout cine; {layout} has its own labels")
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3 or not all(p.isdigit() and 0 < int(p) < 256 for p in parts):
        raise FedsynthError(f"--label-values {text!r}: give three values 1-255, e.g. 1,2,3")
    if len(set(parts)) != 3:
        raise FedsynthError(f"--label-values {text!r}: the three values must differ")
    return int(parts[0]), int(parts[1]), int(parts[2])
