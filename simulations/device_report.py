"""`fedsynth bench --device-report`: a site's DP step and a release's sampling in seconds
and MiB on this machine's device, at the config's size and at the paper's 96x96x13.

The bench's keys are ratios so that they mean the same everywhere; this report holds the
absolute figures a hospital sizes its GPU box by (issue 15, item 5). On CUDA, memory is
the peak the caching allocator handed out (`torch.cuda.max_memory_allocated`); on a CPU,
the measuring process's peak resident set (torch, MONAI, Opacus and the model included).
Each peak is measured in a process of its own, so nothing else the report did counts.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from fedsynth.common.config import Config
from fedsynth.common.models import latent_shape, resolve_device
from fedsynth.simulations.bench import (
    Bench,
    in_own_process,
    measured_steps,
    overridden,
    peak_mb,
    sampler,
    sampling_volumes_per_second,
    site_peak_memory_mb,
)

# Daum et al. 2024 (arXiv 2407.16405): UK Biobank SAX volumes of 13 slices of 96x96, an
# autoencoder that compresses 4x in-plane and keeps the slices (latent 24x24x13).
PAPER_VOLUME = (96, 96, 13)  # H, W, slices
PAPER_SPACING = (1.8, 1.8, 10.0)  # mm: UK Biobank's SAX cine, in-plane and slice
PAPER_AUTOENCODER_LEVELS = 3  # 2 halvings in-plane: 4x

log = logging.getLogger(__name__)


def paper_volume(config: Config) -> Config:
    """The config at PAPER_VOLUME with an autoencoder of PAPER_AUTOENCODER_LEVELS levels
    (the config's level widths; a level it lacks is twice as wide as the one before);
    the latent UNet and everything else as configured.

    Raises FedsynthError where the config cannot take the paper's shape.
    """
    channels = list(config.autoencoder.channels[:PAPER_AUTOENCODER_LEVELS])
    while len(channels) < PAPER_AUTOENCODER_LEVELS:
        channels.append(2 * channels[-1])
    return overridden(
        config,
        {
            "data.shape": list(PAPER_VOLUME),
            "data.spacing": list(PAPER_SPACING),
            "autoencoder.channels": channels,
            "autoencoder.attention-levels": [False] * PAPER_AUTOENCODER_LEVELS,
        },
    )


def _sampling_peak_mb(bench: Bench) -> float:
    """In a fresh process: one DDIM batch of sampling.batch-size volumes, decoded; peak MiB."""
    config = bench.config
    sampler(config, config.sampling.batch_size)(config.sampling.scheduler)()
    return peak_mb(resolve_device(config.device))


def size_report(bench: Bench) -> dict:
    """One size's figures: seconds of a DP-SGD step and of a plain step over the config's
    expected batch of subjects (two volumes each) at the bench's site, a site round's and
    a sampling batch's peak memory in MiB, and sampling seconds per decoded volume (DDIM
    with the config's steps and guidance, in batches of sampling.batch-size). Prints a
    progress line naming the size first (a size takes minutes on a CPU)."""
    config = bench.config
    log.info("bench: device report at %s ...", "x".join(map(str, config.data.shape)))
    steps = measured_steps(bench)
    return {
        "shape": list(config.data.shape),
        "latent": list(latent_shape(config)),
        "trainable": config.privacy.trainable,
        "subjects_per_step": steps["subjects"],
        "dp_step_seconds": round(steps["dp_step_seconds"], 4),
        "nonprivate_step_seconds": round(steps["nonprivate_step_seconds"], 4),
        "dp_over_nonprivate": round(steps["dp_over_nonprivate"], 3),
        "site_peak_memory_mb": round(site_peak_memory_mb(bench), 1),
        "sampling_seconds_per_volume": round(1.0 / sampling_volumes_per_second(bench), 4),
        "sampling_batch_size": config.sampling.batch_size,
        "sampling_steps": config.sampling.steps,
        "sampling_peak_memory_mb": round(in_own_process(_sampling_peak_mb, bench), 1),
    }


def device_report(bench: Bench) -> dict:
    """The device's name and `size_report` at the config's size and at PAPER_VOLUME."""
    device = resolve_device(bench.config.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    sizes = [bench, replace(bench, config=paper_volume(bench.config))]
    return {
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "site_subjects": bench.site_subjects,
        "sizes": [size_report(size) for size in sizes],
    }
