"""Public pretraining: stage 1 the autoencoder, stage 2 the conditioned latent UNet.

Only public data is read here; it carries no DP claim. Each stage saves its training state
(weights, optimiser, loss history) atomically every few seconds, and every step draws its
randomness from a seed of its own (its index), so a killed run continues from its last
save with the same batches and noise it would have drawn, and neither repeats nor skips a
step.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from fedsynth.common.anatomy import agreement, load_labelled, meter_path, train_volume_meter
from fedsynth.common.checkpoint import (
    AUTOENCODER,
    PUBLIC_ATTRIBUTES,
    UNET,
    file_sha256,
    latent_statistics,
    load_torch,
    normalise_latents,
    save_torch,
    write_metadata,
)
from fedsynth.common.config import Config, pretraining_hash
from fedsynth.common.data import MANIFEST, SiteManifest, open_site
from fedsynth.common.diffusion import per_sample_loss, training_scheduler
from fedsynth.common.errors import FedsynthError
from fedsynth.common.feature_net import ensure_feature_net
from fedsynth.common.io import atomic_path, atomic_write_text
from fedsynth.common.lr_schedule import pretraining_schedule
from fedsynth.common.models import ConditionedUNet, build_autoencoder, resolve_device
from fedsynth.common.progress import progress

STATE = "state"
SAVE_EVERY_SECONDS = 30.0


def _train_stage(
    name: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: int,
    step_loss: Callable[[torch.Generator], torch.Tensor],
    state_path: Path,
    seed: int,
    show_progress: bool,
    ema: AveragedModel | None = None,
    schedule: LRScheduler | None = None,
) -> list[float]:
    """Run (or continue) `steps` optimiser steps; returns the loss of every step.

    Step k seeds both its own generator and torch's global one (used inside MONAI, e.g.
    the autoencoder's latent sampling) from (seed, k), so resuming changes nothing.
    `ema` (torch's AveragedModel of `model`) is updated after every step and `schedule`
    (the optimiser's rate) stepped; both are saved with the rest of the state.
    """
    losses: list[float] = []
    if state_path.is_file():
        state = load_torch(state_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        if schedule is not None:
            schedule.load_state_dict(state["schedule"])
        losses = list(state["losses"])

    def save() -> None:
        saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "losses": losses}
        if ema is not None:
            saved["ema"] = ema.state_dict()
        if schedule is not None:
            saved["schedule"] = schedule.state_dict()
        save_torch(state_path, saved)

    model.train()
    bar = progress(range(len(losses), steps), name, show_progress, total=steps - len(losses))
    last_save = time.monotonic()
    for step in bar:
        step_seed = seed * 1_000_003 + step
        torch.manual_seed(step_seed)
        loss = step_loss(torch.Generator().manual_seed(step_seed))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
        if ema is not None:
            ema.update_parameters(model)
        losses.append(float(loss.detach()))
        if not np.isfinite(losses[-1]):
            raise FedsynthError(f"{name}: loss became {losses[-1]} at step {len(losses)}")
        if time.monotonic() - last_save > SAVE_EVERY_SECONDS:
            save()
            last_save = time.monotonic()
    save()
    model.eval()
    return losses


def _random_index(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """A batch of `size` indices into `n` items, drawn with replacement."""
    return torch.randint(0, n, (size,), generator=generator)


def _check_out_folder(out: Path, run_id: dict) -> None:
    """Refuse to continue a folder that holds pretraining of another config or data."""
    marker = out / STATE / "run.json"
    if marker.is_file():
        previous = json.loads(marker.read_text())
        if previous != run_id:
            raise FedsynthError(
                f"{out} holds pretraining of another config or data set; "
                "use a new --out folder (or delete this one)"
            )
    else:
        atomic_write_text(marker, json.dumps(run_id) + "\n")


def pretrain(
    config: Config, data_dir: str | Path, out: str | Path, show_progress: bool = True
) -> dict:
    """Pretrain both networks on the public folder `data_dir`; write a checkpoint to `out`."""
    out = Path(out).expanduser()
    device = resolve_device(config.device)
    dataset, manifest = open_site(data_dir, config.data, show_progress=show_progress)
    data_hash = file_sha256(manifest.root / MANIFEST)
    _check_out_folder(out, {"pretraining_hash": pretraining_hash(config), "data_sha256": data_hash})
    items = [dataset[i] for i in progress(range(len(dataset)), "load public", show_progress)]
    volumes = torch.stack([v for v, _ in items]).to(device)
    attributes = torch.stack([a for _, a in items]).to(device)
    _write_public_attributes(out / PUBLIC_ATTRIBUTES, manifest.records, config)

    torch.manual_seed(config.seed)
    autoencoder = build_autoencoder(config).to(device)
    ae_cfg = config.autoencoder

    def autoencoder_loss(generator: torch.Generator) -> torch.Tensor:
        x = volumes[_random_index(len(volumes), ae_cfg.batch_size, generator)]
        reconstruction, mu, sigma = autoencoder(x)
        kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-12) - 1)
        return (reconstruction - x).abs().mean() + ae_cfg.kl_weight * kl.flatten(1).sum(1).mean()

    ae_losses = _train_stage(
        "autoencoder",
        autoencoder,
        torch.optim.Adam(autoencoder.parameters(), lr=ae_cfg.learning_rate),
        ae_cfg.steps,
        autoencoder_loss,
        out / STATE / AUTOENCODER,
        config.seed,
        show_progress,
    )
    save_torch(out / AUTOENCODER, autoencoder.state_dict())

    with torch.no_grad():
        latents = torch.cat([autoencoder.encode(v[None])[0] for v in volumes])
    latent_stats = latent_statistics(latents)
    latents = normalise_latents(latents, latent_stats)

    unet = ConditionedUNet(config).to(device)
    scheduler = training_scheduler(config.diffusion)
    train = config.training

    def unet_loss(generator: torch.Generator) -> torch.Tensor:
        index = _random_index(len(latents), train.pretrain_batch_size, generator)
        return per_sample_loss(
            unet,
            scheduler,
            latents[index],
            attributes[index],
            config.diffusion.condition_dropout,
            generator,
        ).mean()

    ema = None
    if train.pretrain_ema_decay > 0:  # sampled weights: the average over the last steps
        ema = AveragedModel(unet, multi_avg_fn=get_ema_multi_avg_fn(train.pretrain_ema_decay))
    optimizer = torch.optim.AdamW(unet.parameters(), lr=train.pretrain_learning_rate)
    unet_losses = _train_stage(
        "latent unet",
        unet,
        optimizer,
        train.pretrain_steps,
        unet_loss,
        out / STATE / UNET,
        config.seed + 1,
        show_progress,
        ema,
        pretraining_schedule(optimizer, train),
    )
    if ema is not None:
        unet.load_state_dict(ema.module.state_dict())
    save_torch(out / UNET, unet.state_dict())
    _plot_losses(out / "loss_curves.png", ae_losses, unet_losses)
    meter = _fit_volume_meter(config, manifest, volumes, out, show_progress)
    features = ensure_feature_net(out, data_dir, config, show_progress, (volumes, attributes))
    return write_metadata(
        out,
        config,
        volume_meter=meter,
        feature_net=features,
        data_manifest_sha256=data_hash,
        public_volumes=len(dataset),
        public_subjects=len(dataset.subject_rows),
        autoencoder_steps=len(ae_losses),
        unet_steps=len(unet_losses),
        **latent_stats,
        final_loss={
            "autoencoder": ae_losses[-1] if ae_losses else None,
            "unet": unet_losses[-1] if unet_losses else None,
        },
    )


def _fit_volume_meter(
    config: Config, manifest: SiteManifest, volumes: torch.Tensor, out: Path, show_progress: bool
) -> dict | None:
    """Train the anatomy meter when the public set has label maps; its fit on public data."""
    if config.training.segmenter_steps == 0:
        return None
    labelled = load_labelled(manifest, config.data, show_progress, volumes.cpu())
    if labelled is None:
        return None
    volumes, labels, requested = labelled
    meter = train_volume_meter(
        volumes, labels, requested, config.training.segmenter_steps, config.seed, show_progress
    )
    save_torch(meter_path(out), meter.state())
    measured = meter.measure(volumes)
    return {k: agreement(requested[k], measured[k]) for k in measured}


def _write_public_attributes(path: Path, records: list, config: Config) -> None:
    """The public attribute table, from which `sample` draws when no attributes are given."""
    names = [a.name for a in config.data.attributes]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(names)
    for record in records:
        writer.writerow([f"{record.attributes[n]:g}" for n in names])
    atomic_write_text(path, buffer.getvalue())


def _plot_losses(path: Path, ae_losses: list[float], unet_losses: list[float]) -> None:
    """Loss curves of both stages (raw and smoothed), log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, losses, title in (
        (axes[0], ae_losses, "autoencoder (L1 + KL)"),
        (axes[1], unet_losses, "latent UNet (DDPM loss)"),
    ):
        steps = np.arange(1, len(losses) + 1)
        ax.plot(steps, losses, color="0.75", lw=0.8, label="step")
        if len(losses) >= 10:
            window = max(5, len(losses) // 25)
            smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1 :], smooth, color="C0", lw=1.8, label=f"mean of {window}")
        ax.set(title=title, xlabel="step", ylabel="loss", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
