"""`fedsynth evaluate`: how a synthetic cohort compares with real volumes."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from fedsynth.common.cli import add_json_arguments

if TYPE_CHECKING:
    from pathlib import Path

HELP = "Fidelity, diversity, controllability and utility of a synthetic cohort vs real volumes."
SAMPLING_JSON = "sampling.json"  # written by sample/release beside cohort/, names the checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--real", required=True, metavar="DIR", help="real volumes: a folder with manifest.csv"
    )
    parser.add_argument(
        "--synthetic", required=True, metavar="DIR", help="a synthetic cohort folder (cohort/)"
    )
    parser.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="checkpoint folder with feature_net.pt (and volume_meter.pt); default: the "
        f"'checkpoint' named in SYNTHETIC/../{SAMPLING_JSON}",
    )
    parser.add_argument(
        "--utility-steps",
        type=int,
        metavar="N",
        help="training steps of each utility regressor (default: 200; 0 = skip)",
    )
    add_json_arguments(parser, "print the report as JSON")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="default: 0")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def find_checkpoint(synthetic: str, given: str | None) -> Path:
    """The --checkpoint folder, or the one the cohort's sampling.json names."""
    import json
    from pathlib import Path

    from fedsynth.common.errors import FedsynthError

    if given:
        path = Path(given).expanduser()
        if not (path / "feature_net.pt").is_file():
            raise FedsynthError(f"--checkpoint {given}: no feature_net.pt (see fedsynth pretrain)")
        return path
    record = Path(synthetic).expanduser().resolve().parent / SAMPLING_JSON
    refuse = f"no --checkpoint given and {record} does not name one; pass --checkpoint DIR"
    try:
        named = json.loads(record.read_text()).get("checkpoint")
    except (OSError, ValueError, AttributeError):
        raise FedsynthError(refuse) from None
    if not isinstance(named, str) or not named:
        raise FedsynthError(refuse)
    path = Path(named).expanduser()
    return path if path.is_absolute() else record.parent / path


def check_paths(real: str, synthetic: str) -> None:
    """Refuse, before any model is loaded, a --real or --synthetic without manifest.csv,
    naming the argument (FedsynthError)."""
    from pathlib import Path

    from fedsynth.common.errors import FedsynthError

    for option, folder in (("--real", real), ("--synthetic", synthetic)):
        if not Path(folder).expanduser().is_dir():
            raise FedsynthError(f"{option} {folder}: is not a folder")
        if not (Path(folder).expanduser() / "manifest.csv").is_file():
            raise FedsynthError(f"{option} {folder}: no manifest.csv (a site-style folder)")


def table(report: dict) -> str:
    """The report as a short aligned table for people."""

    def number(value: float | None, digits: int = 3) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    lines = [
        ("real", f"{report['real']['volumes']} volumes ({report['real']['subjects']} subjects)"),
        ("synthetic", f"{report['synthetic']['volumes']} volumes"),
    ]
    for key, label in (("3d", "3D"), ("2d", "2D slices")):
        part = report["fidelity"][key]
        lines.append(
            (
                f"fidelity {label}",
                f"Frechet {number(part['frechet_distance'])}  MMD^2 {number(part['mmd2'], 4)}"
                f"  (n {part['n_real']} real, {part['n_synthetic']} synthetic)",
            )
        )
        halves = part.get("real_halves")
        if halves:
            lines.append(
                (
                    "  real vs real",
                    f"Frechet {number(halves['frechet_distance'])}  MMD^2 "
                    f"{number(halves['mmd2'], 4)}  (two subject halves: the yardstick)",
                )
            )
    diversity = report["diversity"]
    lines.append(
        (
            "diversity MS-SSIM",
            f"synthetic {number(diversity['synthetic_ms_ssim']['mean'])}  "
            f"real {number(diversity['real_ms_ssim']['mean'])}  (lower = more diverse)",
        )
    )
    control = report["controllability"]
    if control:
        for side in ("lv", "rv"):
            lines.append(
                (
                    f"control {side.upper()} cavity",
                    f"r {number(control[side]['pearson_r'], 2)}  "
                    f"MAE {number(control[side]['mae_ml'], 1)} mL  (n {control[side]['n']})",
                )
            )
    utility = report["utility"]
    if utility:
        for key, label in (("tstr", "synthetic"), ("trtr", "real")):
            part = utility[key]
            lines.append(
                (
                    f"utility {key.upper()}",
                    f"MAE {number(part['mae_ml'], 1)} mL  r {number(part['pearson_r'], 2)}  "
                    f"(trained on {part['n_train']} {label}, tested on {part['n_test']} real)",
                )
            )
    width = max(len(name) for name, _ in lines)
    text = [f"{name:<{width}}  {value}" for name, value in lines]
    return "\n".join(text + [f"note: {note}" for note in report["notes"]])


def run(args: argparse.Namespace) -> int:
    import json

    from fedsynth.common.errors import FedsynthError
    from fedsynth.common.evaluation import UTILITY_STEPS, evaluate_cohort

    steps = UTILITY_STEPS if args.utility_steps is None else args.utility_steps
    if steps < 0:
        raise FedsynthError(f"--utility-steps must be >= 0 (got {steps})")
    check_paths(args.real, args.synthetic)
    checkpoint = find_checkpoint(args.synthetic, args.checkpoint)
    report = evaluate_cohort(
        args.real,
        args.synthetic,
        checkpoint,
        seed=args.seed,
        show_progress=not args.quiet,
        utility_steps=steps,
    )
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0
