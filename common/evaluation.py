"""Quality of a synthetic cohort against real volumes: fidelity, diversity, controllability,
utility (docs/release.md).

Both folders are read as sites (`open_site`, the checkpoint's config: same shape, same
intensity scaling); a synthetic cohort's manifest.csv has a site manifest's columns.
- fidelity: Frechet distance (MONAI FIDMetric) and kernel MMD (MONAI MMDMetric) on the
  features of the checkpoint's feature nets (common/feature_net.py: trained on public
  volumes by this project, not Inception or MedicalNet; numbers compare only within
  fedsynth), per volume (3D) and per short-axis slice (2D).
- diversity: mean MS-SSIM (MONAI) over pairs of synthetic volumes, and over pairs of real
  ones for reference; lower means more diverse. Settings fitted to the volume shape.
- controllability: the checkpoint's anatomy meter on the synthetic volumes vs the cavity
  volumes each was generated for (common/sampling.requested_vs_measured).
- utility: train on synthetic, test on real (TSTR) vs train on real, test on real (TRTR):
  a small MONAI ResNet regresses the LV cavity volume at the volume's phase.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml
from monai.metrics import FIDMetric, MMDMetric, MultiScaleSSIMMetric

from fedsynth.common.anatomy import VolumeMeter, agreement, meter_path
from fedsynth.common.checkpoint import CONFIG, load_torch
from fedsynth.common.config import Config, config_from_dict
from fedsynth.common.data import SiteManifest, open_site
from fedsynth.common.errors import FedsynthError
from fedsynth.common.feature_net import (
    FeatureNets,
    fit_regressor,
    load_feature_nets,
)
from fedsynth.common.progress import progress
from fedsynth.common.sampling import agreement_only, requested_vs_measured

MIN_VOLUMES = 2  # per folder: a covariance, an unbiased MMD and one pair need two
MMD_SUBSETS = 10  # equal-size draws averaged when the two sets differ in size
RANDOM_FEATURES = 2048  # random Fourier features approximating the Gaussian kernel
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # MONAI's (Wang et al. 2003)
MS_SSIM_MAX_KERNEL, MS_SSIM_SIGMA, MS_SSIM_MIN_KERNEL = 11, 1.5, 5
MAX_PAIRS = 200  # MS-SSIM pairs drawn per cohort (all pairs when there are fewer)
UTILITY_STEPS, UTILITY_BATCH = 200, 8
UTILITY_SUBJECTS = 4  # real subjects needed: two to train on, two to test on
CAVITY_ATTRIBUTES = ("lvedv", "lvesv", "rvedv", "rvesv")


def checkpoint_config(checkpoint: str | Path) -> Config:
    """The config a checkpoint folder's networks were built from (its config.yaml)."""
    path = Path(checkpoint).expanduser() / CONFIG
    if not path.is_file():
        raise FedsynthError(f"{path.parent} is not a checkpoint folder (no {CONFIG})")
    return config_from_dict(yaml.safe_load(path.read_text()))


# ---------------------------------------------------------------------------------- fidelity


def frechet_distance(real: torch.Tensor, synthetic: torch.Tensor) -> tuple[float, str | None]:
    """Frechet distance between Gaussians fitted to features (N, F) of each set (Heusel et
    al. 2017, via MONAI's FIDMetric), and a note when MONAI had to regularise a singular
    covariance product (it prints that on stdout, which would spoil --json)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # scipy's sqrtm warns on a singular matrix: a note
        value = float(FIDMetric()(synthetic.double(), real.double()))
    numeric = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    said = [printed.getvalue().strip(), *numeric]  # not scipy's deprecation of disp=
    note = "; ".join(dict.fromkeys(filter(None, said))) or None
    return value, note


def median_distance(features: torch.Tensor) -> float:
    """The median Euclidean distance between distinct rows (the median heuristic for a
    Gaussian kernel's bandwidth, Gretton et al. 2012)."""
    distances = torch.pdist(features.double())
    median = float(distances.median()) if len(distances) else 0.0
    return median if median > 0 else 1.0


def gaussian_feature_map(
    dim: int, bandwidth: float, seed: int, count: int = RANDOM_FEATURES
) -> Callable[[torch.Tensor], torch.Tensor]:
    """phi with phi(x).phi(y) ~ exp(-|x-y|^2 / (2 bandwidth^2)): random Fourier features
    (Rahimi and Recht 2007), phi(x) = sqrt(2/D) cos(x W / bandwidth + b), W ~ N(0, 1),
    b ~ U(0, 2 pi); given to MONAI's MMDMetric, whose own kernel is linear (x.y)."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.randn(dim, count, generator=generator, dtype=torch.float64) / bandwidth
    offsets = 2 * math.pi * torch.rand(count, generator=generator, dtype=torch.float64)

    def phi(x: torch.Tensor) -> torch.Tensor:
        return math.sqrt(2.0 / count) * torch.cos(x.double() @ weights + offsets)

    return phi


def kernel_mmd(real: torch.Tensor, synthetic: torch.Tensor, seed: int) -> dict[str, float]:
    """Unbiased MMD^2 (Gretton et al. 2012, eq. 3, MONAI's compute_mmd) under a Gaussian
    kernel whose bandwidth is the median distance between the REAL features, so every
    cohort compared with one real set is measured with the same kernel. Can be slightly
    negative when both sets come from one distribution.

    MONAI's compute_mmd takes two sets of one size: with sizes m != n it is averaged over
    MMD_SUBSETS seeded draws of min(m, n) rows of each set, KID's protocol (Binkowski et
    al. 2018).
    """
    bandwidth = median_distance(real)
    metric = MMDMetric(y_mapping=gaussian_feature_map(real.shape[1], bandwidth, seed))
    size = min(len(real), len(synthetic))
    if len(real) == len(synthetic):
        return {"mmd2": float(metric(real, synthetic)), "bandwidth": bandwidth, "subsets": 1}
    generator = torch.Generator().manual_seed(seed)
    values = [
        float(
            metric(
                real[torch.randperm(len(real), generator=generator)[:size]],
                synthetic[torch.randperm(len(synthetic), generator=generator)[:size]],
            )
        )
        for _ in range(MMD_SUBSETS)
    ]
    return {"mmd2": float(np.mean(values)), "bandwidth": bandwidth, "subsets": MMD_SUBSETS}


def fidelity(real: torch.Tensor, synthetic: torch.Tensor, seed: int) -> dict:
    """Frechet distance and kernel MMD between two feature sets (N, F) and (M, F)."""
    distance, note = frechet_distance(real, synthetic)
    mmd = kernel_mmd(real, synthetic, seed)
    result = {
        "frechet_distance": distance,
        "mmd2": mmd["mmd2"],
        "mmd_bandwidth": mmd["bandwidth"],
        "mmd_subsets": mmd["subsets"],
        "n_real": len(real),
        "n_synthetic": len(synthetic),
        "features": real.shape[1],
    }
    return result | ({"note": note} if note else {})


# --------------------------------------------------------------------------------- diversity


def ms_ssim_settings(shape: tuple[int, int, int]) -> dict:
    """MS-SSIM settings that MONAI accepts for volumes of `shape`.

    MONAI's defaults (5 scales, 11-voxel kernel) need every axis >= 176 voxels: it requires
    size // (scales - 1)^2 >= kernel on each axis, and each scale halves every axis (after
    the last one too), so the kernel must fit the coarsest one and every axis must be at
    least 2^scales. The most scales (up to 5) whose in-plane kernel
    is at least 5 voxels are taken, each axis' kernel the largest odd size (<= 11) both
    rules allow; MONAI's scale weights are cut to that many and renormalised to sum 1. One
    scale (plain SSIM) with a 3-voxel kernel always fits the smallest allowed shape (4).
    32x32x8 gives 3 scales, kernel 7x7x1; 96x96x13 gives 3 scales, kernel 11x11x3.
    """
    scales = len(MS_SSIM_WEIGHTS)
    while scales > 1:
        kernel = _ms_ssim_kernel(shape, scales)
        if min(kernel[:2]) >= MS_SSIM_MIN_KERNEL and min(kernel) >= 1:
            break
        scales -= 1
    weights = np.array(MS_SSIM_WEIGHTS[:scales])
    return {
        "scales": scales,
        "kernel_size": _ms_ssim_kernel(shape, scales),
        "kernel_sigma": MS_SSIM_SIGMA,
        "weights": (weights / weights.sum()).round(4).tolist(),
        "data_range": 1.0,
    }


def _ms_ssim_kernel(shape: tuple[int, int, int], scales: int) -> list[int]:
    """Per axis, the largest odd kernel (<= 11) MONAI allows at `scales` scales; 0 or less
    where none fits (then the in-plane check fails, or the slice axis is too short)."""
    divisor = max(1, scales - 1) ** 2
    kernel = []
    for size in shape:
        k = min(MS_SSIM_MAX_KERNEL, size // divisor, size >> (scales - 1))
        if size >> scales == 0:  # MONAI also pools after the last scale
            k = 0
        kernel.append(k - 1 + k % 2)  # odd, centred
    return kernel


def mean_pairwise_ms_ssim(
    volumes: torch.Tensor, settings: dict, seed: int, label: str, show_progress: bool
) -> dict:
    """Mean MS-SSIM over up to MAX_PAIRS distinct pairs of volumes (N, 1, H, W, D), drawn
    with a seeded generator (all pairs when there are fewer)."""
    pairs = [(i, j) for i in range(len(volumes)) for j in range(i + 1, len(volumes))]
    if len(pairs) > MAX_PAIRS:
        picks = np.random.default_rng(seed).choice(len(pairs), MAX_PAIRS, replace=False)
        pairs = [pairs[k] for k in sorted(picks)]
    metric = MultiScaleSSIMMetric(
        spatial_dims=3,
        data_range=settings["data_range"],
        kernel_size=settings["kernel_size"],
        kernel_sigma=settings["kernel_sigma"],
        weights=settings["weights"],
        reduction="none",
    )
    values = []
    chunks = [pairs[k : k + 32] for k in range(0, len(pairs), 32)]
    for chunk in progress(chunks, f"MS-SSIM {label}", show_progress):
        first, second = (torch.tensor(side) for side in zip(*chunk, strict=True))
        value = metric(volumes[first], volumes[second])
        assert isinstance(value, torch.Tensor)  # one tensor of per-pair values
        values.append(value.flatten())
    return {"mean": float(torch.cat(values).mean()), "pairs": len(pairs)}


# --------------------------------------------------------------------------------- utility


def lv_cavity_ml(rows: list[dict[str, float]]) -> np.ndarray:
    """The LV cavity volume (mL) at each row's phase: LVESV at ES, LVEDV otherwise."""
    return np.array([row["lvesv"] if row.get("phase", 0) == 1 else row["lvedv"] for row in rows])


def predict(model: torch.nn.Module, volumes: torch.Tensor, batch: int = 16) -> np.ndarray:
    """A regressor's first output for volumes (N, 1, H, W, D), in batches, as float64 (N,)."""
    with torch.no_grad():
        starts = range(0, len(volumes), batch)
        predicted = torch.cat([model(volumes[i : i + batch]) for i in starts])
    return predicted[:, 0].double().numpy()


def train_and_test(
    train_volumes: torch.Tensor,
    train_ml: np.ndarray,
    test_volumes: torch.Tensor,
    test_ml: np.ndarray,
    steps: int,
    seed: int,
    label: str,
    show_progress: bool,
) -> dict:
    """Fit a small MONAI ResNet regressor of mL from volumes (N, 1, H, W, D), its targets
    standardised by the training set's mean and spread; its MAE (mL) and r on the test set."""
    mean, spread = float(train_ml.mean()), float(train_ml.std()) or 1.0
    targets = torch.from_numpy((train_ml - mean) / spread).float()[:, None]
    model, _ = fit_regressor(
        3, (2, 2, 1), train_volumes, targets, steps, UTILITY_BATCH, seed, label, show_progress
    )
    result = agreement(test_ml, predict(model, test_volumes) * spread + mean)
    return {
        "mae_ml": result["mae_ml"],
        "pearson_r": result["pearson_r"],
        "n_train": len(train_volumes),
        "n_test": len(test_volumes),
    }


def split_subjects(manifest: SiteManifest, seed: int) -> tuple[list[int], list[int]]:
    """Row indices of a seeded half of the subjects (test) and of the rest (train): a
    subject's volumes stay on one side."""
    subjects = sorted({r.subject for r in manifest.records})
    order = np.random.default_rng(seed).permutation(len(subjects))
    test = {subjects[k] for k in order[: len(subjects) // 2]}
    rows = list(enumerate(manifest.records))
    return [i for i, r in rows if r.subject in test], [i for i, r in rows if r.subject not in test]


# ----------------------------------------------------------------------------------- cohort


def _load(
    folder: str | Path, config: Config, label: str, show_progress: bool
) -> tuple[torch.Tensor, list[dict[str, float]], SiteManifest]:
    """(volumes (N, 1, H, W, D), attribute rows, manifest) of a folder read as a site."""
    dataset, manifest = open_site(folder, config.data, show_progress=show_progress)
    if len(dataset) < MIN_VOLUMES:
        raise FedsynthError(
            f"{label} folder {manifest.root} has {len(dataset)} usable volume(s); "
            f"the metrics need at least {MIN_VOLUMES}"
        )
    volumes = [dataset[i][0] for i in progress(range(len(dataset)), f"load {label}", show_progress)]
    rows = [dict(r.attributes) for r in manifest.records]
    return torch.stack(volumes), rows, manifest


def _check_synthetic_shape(manifest: SiteManifest, config: Config) -> None:
    """A cohort is written at its model's shape; another shape means another checkpoint."""
    import nibabel as nib

    shape = tuple(config.data.shape)
    for record in manifest.records:
        image = nib.load(record.image)
        assert isinstance(image, nib.Nifti1Image)  # check_site opened it with open_nifti
        found = tuple(image.shape[:3])
        if found != shape:
            raise FedsynthError(
                f"synthetic volume {record.image.name} is {'x'.join(map(str, found))}, but the "
                f"checkpoint's model shape is {'x'.join(map(str, shape))}: pass the checkpoint "
                "that generated the cohort"
            )


def evaluate_cohort(
    real_dir: str | Path,
    synthetic_dir: str | Path,
    checkpoint: str | Path,
    seed: int = 0,
    show_progress: bool = True,
    utility_steps: int = UTILITY_STEPS,
) -> dict:
    """Fidelity, diversity, controllability and utility of a synthetic cohort (JSON-able).

    `checkpoint` is a folder with config.yaml and feature_net.pt (volume_meter.pt for
    controllability). Raises FedsynthError, one line, for a missing or unusable folder, a
    checkpoint without feature nets, fewer than MIN_VOLUMES volumes in a folder, or
    synthetic volumes of another shape than the checkpoint's model.
    """
    config = checkpoint_config(checkpoint)
    nets = load_feature_nets(checkpoint)
    if tuple(nets.info["shape"]) != tuple(config.data.shape):
        raise FedsynthError(
            f"checkpoint {checkpoint}: feature_net.pt was trained at shape {nets.info['shape']}, "
            f"config.yaml says {list(config.data.shape)}"
        )
    synthetic, synthetic_rows, synthetic_manifest = _load(
        synthetic_dir, config, "synthetic", show_progress
    )
    _check_synthetic_shape(synthetic_manifest, config)
    real, real_rows, real_manifest = _load(real_dir, config, "real", show_progress)
    notes = [
        "features come from networks this project trained on public volumes "
        f"({nets.info['steps']} steps, {nets.info['public_volumes']} volumes), not Inception "
        "or MedicalNet: Frechet distances and MMDs compare only within fedsynth, with the "
        "same feature_net.pt, never with a paper's FID",
        f"volumes are {'x'.join(map(str, config.data.shape))} (the paper: 96x96x13)",
        "kernel MMD: MONAI's MMDMetric alone uses the linear kernel x.y (it compares only "
        f"means); here it gets {RANDOM_FEATURES} random Fourier features of a Gaussian kernel "
        "(bandwidth: median distance between the real features) as its y_mapping",
    ]
    report = {
        "real": _folder_facts(real_manifest),
        "synthetic": _folder_facts(synthetic_manifest),
        "checkpoint": str(Path(checkpoint).expanduser()),
        "seed": seed,
        "feature_net": {
            k: nets.info[k] for k in ("steps", "public_volumes", "features_3d", "features_2d")
        },
        "fidelity": _fidelity(
            nets, real, synthetic, split_subjects(real_manifest, seed), seed, notes
        ),
    }
    settings = ms_ssim_settings(config.data.shape)
    report["diversity"] = {
        "synthetic_ms_ssim": mean_pairwise_ms_ssim(
            synthetic, settings, seed, "synthetic", show_progress
        ),
        "real_ms_ssim": mean_pairwise_ms_ssim(real, settings, seed, "real", show_progress),
        "ms_ssim_settings": settings,
    }
    notes.append(
        f"MS-SSIM with {settings['scales']} scale(s), kernel "
        f"{'x'.join(map(str, settings['kernel_size']))}, sigma {settings['kernel_sigma']:g}, "
        "weights MONAI's first ones renormalised (the paper's 5 scales need 176+ voxels per axis)"
    )
    report["controllability"] = _controllability(
        checkpoint, config, synthetic, synthetic_rows, notes
    )
    report["utility"] = _utility(
        config,
        real,
        real_rows,
        real_manifest,
        synthetic,
        synthetic_rows,
        seed,
        utility_steps,
        notes,
        show_progress,
    )
    report["notes"] = notes
    return json_safe(report)


def json_safe(value):
    """NaN and infinities (e.g. r of a constant prediction) as None: strict JSON has none."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _folder_facts(manifest: SiteManifest) -> dict:
    return {
        "path": str(manifest.root),
        "volumes": len(manifest.records),
        "subjects": len(manifest.subjects()),
        "rejected": len(manifest.rejected),
    }


def _fidelity(
    nets: FeatureNets,
    real: torch.Tensor,
    synthetic: torch.Tensor,
    halves: tuple[list[int], list[int]],
    seed: int,
    notes: list[str],
) -> dict:
    """Each feature space's distances, synthetic vs real, and the same between the two
    subject halves of the real set (`real_halves`): the yardstick of what two samples of
    one distribution of that size give (each half is smaller, so it sits a little high)."""
    result = {}
    for key, features in (("3d", nets.volume_features), ("2d", nets.slice_features)):
        real_features = features(real)
        result[key] = fidelity(real_features, features(synthetic), seed)
        first, second = (real[list(half)] for half in halves)
        if min(len(first), len(second)) >= MIN_VOLUMES:
            yardstick = fidelity(features(first), features(second), seed)
            result[key]["real_halves"] = {
                k: yardstick[k] for k in ("frechet_distance", "mmd2", "n_real", "n_synthetic")
            }
    for key, part in result.items():
        smallest = min(part["n_real"], part["n_synthetic"])
        if smallest <= part["features"]:
            notes.append(
                f"{key} Frechet distance: {smallest} samples for {part['features']} features, "
                "so a covariance is singular; the distance is biased upward and noisy "
                "(compare cohorts of equal size)"
            )
    return result


def _controllability(
    checkpoint: str | Path,
    config: Config,
    synthetic: torch.Tensor,
    rows: list[dict[str, float]],
    notes: list[str],
) -> dict | None:
    names = {a.name for a in config.data.attributes}
    location = meter_path(Path(checkpoint).expanduser())
    if not location.is_file():
        notes.append("controllability skipped: the checkpoint has no volume_meter.pt")
        return None
    if not names.issuperset(CAVITY_ATTRIBUTES):
        notes.append(f"controllability skipped: needs attributes {', '.join(CAVITY_ATTRIBUTES)}")
        return None
    meter = VolumeMeter.from_state(load_torch(location))
    return agreement_only(requested_vs_measured(meter, synthetic, rows))


def _utility(
    config: Config,
    real: torch.Tensor,
    real_rows: list[dict[str, float]],
    real_manifest: SiteManifest,
    synthetic: torch.Tensor,
    synthetic_rows: list[dict[str, float]],
    seed: int,
    steps: int,
    notes: list[str],
    show_progress: bool,
) -> dict | None:
    names = {a.name for a in config.data.attributes}
    if steps == 0:
        notes.append("utility skipped (0 training steps asked for)")
        return None
    if not names.issuperset(("lvedv", "lvesv")):
        notes.append("utility skipped: needs attributes lvedv and lvesv")
        return None
    if len(real_manifest.subjects()) < UTILITY_SUBJECTS:
        notes.append(
            f"utility skipped: the real folder has {len(real_manifest.subjects())} subjects; "
            f"a train/test split by subject needs {UTILITY_SUBJECTS}"
        )
        return None
    test, train = split_subjects(real_manifest, seed)
    real_ml = lv_cavity_ml(real_rows)
    common = (real[test], real_ml[test], steps, seed)
    tstr = train_and_test(
        synthetic, lv_cavity_ml(synthetic_rows), *common, "utility TSTR", show_progress
    )
    trtr = train_and_test(real[train], real_ml[train], *common, "utility TRTR", show_progress)
    notes.append(
        "utility: a MONAI ResNet regresses the LV cavity volume (LVEDV at ED, LVESV at ES); "
        f"trained {steps} steps on the synthetic cohort (TSTR) or on half of the real subjects "
        "(TRTR), both tested on the other half"
    )
    return {"target": "lv_cavity_ml", "steps": steps, "tstr": tstr, "trtr": trtr}
