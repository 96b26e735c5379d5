"""`fedsynth pretrain`: train the autoencoder and the latent UNet on public data only."""

from __future__ import annotations

import argparse

from fedsynth.common.cli import add_config_arguments, config_from_args

HELP = "Pretrain the autoencoder and the conditioned latent UNet on PUBLIC data (resumable)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--data", required=True, metavar="DIR", help="public data folder (manifest.csv + NIfTI)"
    )
    parser.add_argument(
        "--out",
        required=True,
        metavar="CKPT_DIR",
        help="checkpoint folder; an interrupted run continues when given the same folder",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from fedsynth.server.pretrain import pretrain

    config = config_from_args(args)
    metadata = pretrain(config, args.data, args.out, show_progress=not args.quiet)
    loss = {k: "n/a" if v is None else f"{v:.4g}" for k, v in metadata["final_loss"].items()}
    print(
        f"checkpoint {args.out}: autoencoder {metadata['autoencoder_steps']} steps "
        f"(loss {loss['autoencoder']}), latent UNet {metadata['unet_steps']} steps "
        f"(loss {loss['unet']})"
    )
    return 0
