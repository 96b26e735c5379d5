"""`fedsynth privacy`: `plan` (the noise for a target epsilon) and `verify` (a release's
epsilons recomputed from its ledger)."""

from __future__ import annotations

import argparse

from fedsynth.common.cli import add_json_arguments

HELP = (
    "Privacy tools: `plan` finds the DP-SGD noise multiplier that lands on a target epsilon; "
    "`verify` recomputes a release's epsilons from its ledger."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    plan = actions.add_parser(
        "plan",
        help="noise multiplier for a target epsilon",
        description="Smallest noise multiplier whose planned steps spend at most the target "
        "epsilon (and within 1% of it), for one site with Poisson sampling of subjects.",
    )
    plan.add_argument("--epsilon", required=True, type=float, help="target epsilon")
    plan.add_argument("--delta", required=True, type=float, help="delta, below 1/subjects")
    plan.add_argument(
        "--sample-rate",
        required=True,
        type=float,
        metavar="Q",
        help="Poisson sample rate of subjects per step, in (0, 1]",
    )
    plan.add_argument(
        "--steps",
        required=True,
        type=int,
        metavar="N",
        help="planned DP-SGD steps in total (rounds x local steps)",
    )
    plan.add_argument(
        "--accountant", choices=("rdp", "prv"), default="rdp", help="Opacus accountant (rdp)"
    )
    plan.add_argument(
        "--subjects", type=int, metavar="N", help="subjects at the site: refuse delta >= 1/N"
    )
    add_json_arguments(plan, "print one JSON object")
    verify = actions.add_parser(
        "verify",
        help="recompute a release's epsilons from its ledger",
        description="Recompute every site's epsilon in a release folder from its ledger.jsonl "
        "with Opacus, and check it equals what privacy.json states.",
    )
    verify.add_argument(
        "--release", required=True, metavar="DIR", help="a folder written by fedsynth release"
    )
    add_json_arguments(verify, "print one JSON object")


def run(args: argparse.Namespace) -> int:
    return _verify(args) if args.action == "verify" else _plan(args)


def _verify(args: argparse.Namespace) -> int:
    import json

    from fedsynth.common.privacy_verify import verify_release

    recomputed = verify_release(args.release)
    if args.json:
        print(json.dumps({"verified": True, "site_epsilon": recomputed}))
    else:
        sites = ", ".join(f"{site} {value:.4f}" for site, value in recomputed.items())
        print(f"verified: every epsilon in privacy.json recomputes from ledger.jsonl ({sites})")
    return 0


def _plan(args: argparse.Namespace) -> int:
    import json

    from fedsynth.common.accountant import Segment, check_delta, epsilon, plan_noise

    if args.subjects is not None:
        check_delta(args.delta, args.subjects)
    sigma = plan_noise(args.epsilon, args.delta, args.sample_rate, args.steps, args.accountant)
    achieved = epsilon([Segment(sigma, args.sample_rate, args.steps)], args.delta, args.accountant)
    result = {
        "noise_multiplier": sigma,
        "epsilon": achieved,
        "target_epsilon": args.epsilon,
        "delta": args.delta,
        "sample_rate": args.sample_rate,
        "steps": args.steps,
        "accountant": args.accountant,
        "subjects": args.subjects,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"noise multiplier {sigma:.4f} spends epsilon {achieved:.4f} "
            f"(target {args.epsilon:g}, delta {args.delta:g}, sample rate {args.sample_rate:g}, "
            f"{args.steps} steps, {args.accountant} accountant)"
        )
    return 0
