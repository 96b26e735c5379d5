"""`fedsynth audit`: a site's own memorisation audit of a released synthetic cohort.

Run at the hospital, on its own machine: it reads the site's private volumes without DP,
so what it prints is for the site to decide whether to share, and only figures over enough
records, rounded, with the site's subject counts as its public size unless it opts in to
disclose them, as in its node config (see client/audit.py and common/audit_publication.py).
"""

from __future__ import annotations

import argparse

from fedsynth.common.cli import add_config_arguments, add_json_arguments

HELP = (
    "Memorisation audit of a synthetic cohort against this site's training and held-out "
    "subjects (distance to closest record, membership inference); outside the DP guarantee."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--release",
        required=True,
        metavar="DIR",
        help="the release folder: its cohort/ is audited only if it matches the SHA-256 of "
        "every file in its cohort.sha256",
    )
    parser.add_argument(
        "--data-path", required=True, metavar="DIR", help="the site's training subjects"
    )
    parser.add_argument(
        "--holdout",
        metavar="DIR",
        help="the same site's subjects the study never trained on (e.g. newer patients)",
    )
    parser.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="the study's final model (a round checkpoint folder): membership inference "
        "with --holdout; its config sets the model's resolution",
    )
    parser.add_argument(
        "--reference",
        metavar="DIR",
        help="the public pretrained checkpoint: calibrates the membership attack "
        "(reference loss minus model loss)",
    )
    parser.add_argument(
        "--out",
        default="audit",
        metavar="DIR",
        help="private folder (0700) for the pairs montage and per-pair distances; must be new, "
        "empty or a previous audit's (default: ./audit)",
    )
    add_config_arguments(parser)  # the model's resolution when no --checkpoint is given
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="default: 0")
    parser.add_argument(
        "--disclose-subject-count",
        action="store_true",
        help="publish the exact subject counts of --data-path and --holdout (as the node "
        "config's disclose-subject-count); default: each rounded down to two significant "
        "figures and a multiple of 10",
    )
    parser.add_argument(
        "--public-subjects",
        type=int,
        metavar="M",
        help="publish M (at most the real count, as the node config's public-subjects) as "
        "--data-path's subject count; --holdout's is rounded down",
    )
    add_json_arguments(
        parser,
        "print the figures a site may share as JSON (rounded; withheld below the minimum "
        "counts), as in --out/shared.json",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import json

    from fedsynth.client.audit import AuditInputs, PublicSizes, run_audit, summary_lines
    from fedsynth.common.cli import config_from_args

    sizes = PublicSizes(args.disclose_subject_count, args.public_subjects)
    inputs = AuditInputs.from_paths(
        release=args.release,
        data_path=args.data_path,
        holdout=args.holdout,
        checkpoint=args.checkpoint,
        reference=args.reference,
        out=args.out,
    )
    report = run_audit(
        inputs,
        config=None if inputs.checkpoint else config_from_args(args),
        seed=args.seed,
        show_progress=not args.quiet,
        sizes=sizes,
    )
    print(json.dumps(report, indent=2) if args.json else "\n".join(summary_lines(report)))
    return 0
