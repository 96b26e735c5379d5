"""A site's memorisation audit of a released synthetic cohort, run on the site's own machine.

OUTSIDE THE DP GUARANTEE. The audit reads the site's private volumes (the subjects it
trained on and subjects it never trained on) without any DP mechanism, so its numbers are
computed from private data: they are for the site to look at and to decide whether to
share (`fedsynth release --audit FILE` puts them in report.html). What is printed is
aggregate only (no paths, no subject ids, no per-subject values) and follows the rule
below; anything per pair or per subject goes to the private `--out` folder.

Two questions:

1. Does the cohort copy training records? Distance to closest record (DCR; Park et al.
   2018, "Data synthesis based on generative adversarial networks", PVLDB 11(10)): for each
   synthetic volume, the distance to its nearest training record and to its nearest
   held-out record. The distance is the per-voxel RMSE between volumes at the model's
   resolution, as `open_site` gives them (the config's shape, intensities scaled to [0, 1]);
   a record is a subject, at the distance of the nearest of its volumes (ED, ES, repeats).
   The share of synthetic volumes closer to a training subject than to any held-out one is
   0.5 when nothing is memorised and the two sets are equally large and alike (Platzer &
   Reutterer 2021, "Holdout-based fidelity and privacy assessment of mixed-type synthetic
   data", Front. Big Data 4:679939). Unequal sets are made equal by subsampling the larger
   one to the smaller's size, seeded; the share is the mean over `SHARE_SUBSAMPLES` such
   draws (ties count one half). The nearest-neighbour distance ratio (NNDR: nearest / second
   nearest training subject; Zhao et al. 2021, CTAB-GAN, arXiv:2102.08369) is near 0 for a
   near-copy of one record and near 1 for a volume that is as far from its nearest record as
   from the next.
2. Does the model remember who it trained on? A calibrated loss-ratio membership-inference
   attack, in the spirit of SecMI (Duan et al. 2023, "Are diffusion models vulnerable to
   membership inference attacks?", ICML) and PIA (Kong et al. 2024, "An efficient
   membership inference attack for the diffusion model by proximal initialization",
   ICLR), which read a diffusion model's error at chosen timesteps, and of the
   loss-threshold attack (Yeom et al. 2018, CSF; for diffusion models Carlini et al. 2023,
   "Extracting training data from diffusion models", USENIX Security). Each subject's
   diffusion loss under the study's final model, on its latents through the checkpoint's
   frozen autoencoder, with fixed noise: `LOSS_DRAWS` draws, each one noise tensor and one
   timestep, stratified over the schedule (draw k in its k-th of LOSS_DRAWS equal parts),
   shared by every subject and every model, seeded, conditional on the subject's
   attributes. The draws fall in `LOSS_BANDS` timestep bands of consecutive draws (band b:
   the b-th of LOSS_BANDS equal parts of the schedule); a subject's loss in a band is the
   mean over its volumes and the band's draws, (S, LOSS_BANDS). Members are the training
   subjects, non-members the held-out ones. Score, with `--reference` (the public
   checkpoint the study started from): the mean over the bands of log(reference loss /
   model loss), each band's log ratio a difficulty-calibrated score (Watson et al. 2022,
   "On the importance of difficulty calibration in membership inference attacks", ICLR;
   the offline reference model of Carlini et al. 2022, "Membership inference attacks from
   first principles", IEEE S&P; the ratio rather than the difference puts bands whose
   losses differ in scale on one footing), the bands weighted equally: nothing is fitted
   on members or non-members. Unlike SecMI and PIA there is no DDIM inversion (SecMI's
   t-error from a deterministic reverse and forward step, PIA's noise from the model's
   output at t = 0): the noise is fixed and the same for everyone; no attack model is
   trained (SecMI-NN) and no timestep is chosen on labelled data. Without `--reference`:
   minus the model loss (mean over the draws). ROC AUC is the Mann-Whitney U statistic
   over n_members x n_nonmembers (ties one half; Hanley & McNeil 1982); TPR at a given FPR
   is read off the empirical ROC (Fawcett 2006) as the largest TPR among thresholds whose
   FPR is at most that value. Intervals, 95%: the AUC +- 1.96 Hanley & McNeil standard
   errors (1982, Radiology 143:29, eq. 2; no bootstrap), clipped to [0, 1]; a TPR's
   Clopper-Pearson interval (1934) of the members flagged out of n_members, at the
   threshold found on the non-members (its own uncertainty is not counted). With n
   non-members the smallest non-zero FPR is 1/n (`fpr_resolution`): where it exceeds the
   target, the TPR reported is the TPR at zero false positives among the n and
   `fpr_not_resolvable` says, in words, that the TPR at that FPR is not resolvable;
   `few_subjects` says when members or non-members are fewer than 30.

What may be shared (common/audit_publication.py): the distances are between one synthetic
volume and one patient's record, and with a small cohort or site an exact quantile of them
picks out who was in training. So what `--json` prints (and --out/shared.json holds, the
file a site shares and `fedsynth release --audit` accepts) carries a figure only when at
least `MIN_RECORDS` (11, the small-cell rule of health statistics) synthetic volumes and 11
distinct subjects stand behind it, a quantile being the mean of 11 order statistics around
its rank (of one series, only quantiles whose windows are identical or disjoint), rounded to
2 significant digits, no rate a count of 1 to 10 records; below that the field reads
"withheld: fewer than 11 ...". The site's subject counts are published as its public size
(PublicSizes: the node config's rule, exact only when the site opts in), and every
decision to withhold reads the published sizes and figures only, the worst case over
every count the published size stands for (a gate on the exact count would publish a
bit of it: 10 and 15 subjects both publish 10): a set published as 10 (10 to 19) has its
figures withheld, a TPR is withheld if it may be a count of 1 to 10 of any count in the
members' range, and nndr is withheld (not null) below 11 training subjects as published,
so that null does not tell a single subject. The exact figures and counts, per-pair
distances and the pairs montage stay in --out.

The audited cohort is a release's: `--release RELEASE` reads RELEASE/cohort and refuses it
unless it holds exactly the files RELEASE/cohort.sha256 lists, with their SHA-256, and
RELEASE/privacy.json names a study and that record's fingerprint (common/cohort_hashes.py);
a coordinator cannot pass patients' volumes off as the cohort without the audit naming a
fingerprint other than the one report.html publishes, which the site compares before
sharing.

The shared JSON (`fedsynth audit --json`, --out/shared.json):

    outside_dp_guarantee  true
    note                  the sentence above, for a report (and the few-records warning)
    distance              what DCR measures (per-voxel RMSE at the model's resolution)
    published             {min_records, significant_digits, rule}
    cohort_sha256         the audited cohort's fingerprint (SHA-256 of cohort.sha256)
    cohort_volumes        synthetic volumes audited
    training_subjects     subjects in --data-path (counted as the study's DP counts them),
                          as the site's public size (below)
    holdout_subjects      subjects in --holdout as its public size, or null
    subject_counts        how they are published (client/public_size.py's rule): "rounded"
                          (n rounded down to two significant figures and a multiple of 10,
                          1 below 10; the default), "declared" (--public-subjects M for
                          --data-path, at most its count; held-out rounded) or "exact"
                          (--disclose-subject-count: the site opted in)
    seed                  the seed of the subsampling and the loss noise
    dcr                   {train_q05, train_q25, train_median: DCR to training quantiles,
                           holdout_q05, holdout_q25, holdout_median (null without holdout),
                           closer_to_training_share (null without holdout),
                           share_subsampled_to (the smaller set's public size, or null),
                           nndr_q05, nndr_median}
    membership_inference  null without --checkpoint and --holdout, else
                          {score: "mean over timestep bands of log(reference loss / model
                           loss)" or "-model loss",
                           auc, auc_ci95_low, auc_ci95_high,
                           tpr_at_1pct_fpr, tpr_at_1pct_fpr_ci95_low, ..._ci95_high,
                           tpr_at_0_1pct_fpr, tpr_at_0_1pct_fpr_ci95_low, ..._ci95_high,
                           intervals (how the intervals are computed, in words),
                           fpr_resolution, fpr_not_resolvable (null, or the FPRs below
                           fpr_resolution in words), few_subjects (null, or a side under
                           30 in words), n_members, n_nonmembers (the public sizes),
                           loss_draws, loss_bands,
                           auc_uncalibrated (-model loss; null without --reference)}
    (each figure a number rounded to 2 significant digits or "withheld: fewer than 11 ...";
     an interval's bounds are computed from the shared figure and the public sizes, rounded
     outward, and withheld with the figure; fpr_resolution and the notes read
     n_nonmembers as published, fpr_resolution at least the true 1 / n)

Private files in `--out` (0700, files 0600): pairs.png (the `PAIRS` most similar
synthetic/training pairs, each synthetic volume above its nearest training volume, basal,
mid and apical slices, for a human to judge), pairs.csv (each synthetic volume's nearest
training subject, DCRs and NNDR), audit.json (the same keys with exact figures: quantiles
read off the values, np.quantile's linear interpolation, and the exact subject counts),
shared.json.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from fedsynth.client.public_size import PublicSizeAboveCount
from fedsynth.common import audit_publication as publish
from fedsynth.common.audit_publication import (
    CALIBRATED,
    CI_KEYS,
    FPR_TARGETS,
    FPR_WORDS,
    INTERVALS,
    MIN_RECORDS,
    attack_notes,
    auc_interval,
    clopper_pearson,
)
from fedsynth.common.checkpoint import Pretrained, load_pretrained
from fedsynth.common.cohort_hashes import check_cohort_hashes
from fedsynth.common.config import Config, DataConfig
from fedsynth.common.data import (
    MANIFEST,
    Record,
    SiteManifest,
    check_site,
    open_nifti,
    open_site,
    read_nifti,
)
from fedsynth.common.diffusion import fixed_noise_draw_losses
from fedsynth.common.errors import FedsynthError
from fedsynth.common.io import PRIVATE_MODE, atomic_write_text, private_dir
from fedsynth.common.models import ConditionedUNet, resolve_device
from fedsynth.common.orientation import short_axis_ornt
from fedsynth.common.progress import progress
from fedsynth.common.sampling import COHORT, montage
from fedsynth.common.scan_match import ScanIndex, views
from fedsynth.common.subject_identity import normalise_id

NOTE = (
    "Outside the DP guarantee: computed at the site from its private training and held-out "
    "subjects without DP; the site decides whether to share these numbers."
)
DISTANCE = (
    "per-voxel RMSE at the model's resolution (intensities in [0, 1]); a subject's distance "
    "is that of the nearest of its volumes"
)
SHARE_SUBSAMPLES = 25  # seeded subsamples of the larger set, averaged, for the share
LOSS_DRAWS = 8  # fixed (noise, timestep) draws per volume for the membership loss
LOSS_BANDS = 4  # timestep bands of the calibrated score, LOSS_DRAWS / LOSS_BANDS draws each
LOSS_BATCH = 16  # volumes per UNet forward in the membership loss
PAIRS = 3  # most similar (synthetic, training) pairs in the private montage
SHARED = "shared.json"  # what --json prints: the file a site shares
OUT_FILES = ("pairs.png", "pairs.csv", "audit.json", SHARED)
COUNTS_SHOWN = {  # subject_counts, as the printed summary says it
    "rounded": "rounded down to the site's public size; --disclose-subject-count for exact",
    "declared": "training as declared by --public-subjects, held-out rounded down",
    "exact": "exact: --disclose-subject-count",
}
FEW_SUBJECTS = 20  # below this, an aggregate is close to one record's own value
FEW_NOTE = (
    "few records: with fewer than {n} subjects in a set or volumes in the cohort, these "
    "aggregates are close to single records' values (those resting on fewer than "
    f"{MIN_RECORDS} are withheld); weigh that before sharing them"
)


@dataclass(frozen=True)
class AuditInputs:
    """The folders of one audit, checked to exist (each error names its option)."""

    release: Path
    data_path: Path
    holdout: Path | None
    checkpoint: Path | None
    reference: Path | None
    out: Path

    @classmethod
    def from_paths(cls, **paths: str | Path | None) -> AuditInputs:
        """Expand and check the given folders; refuse a reference without a checkpoint and
        an --out folder holding anything but a previous audit's files."""
        given = {k: Path(v).expanduser() if v else None for k, v in paths.items()}
        for name, path in given.items():
            if name != "out" and path is not None and not path.is_dir():
                raise FedsynthError(f"--{name.replace('_', '-')} {path} is not a folder")
        if given["reference"] is not None and given["checkpoint"] is None:
            raise FedsynthError("--reference calibrates the attack on --checkpoint: give both")
        out = given["out"]
        if out is None:
            raise FedsynthError("--out is required")
        if out.exists() and not out.is_dir():
            raise FedsynthError(f"--out {out} is not a folder")
        if out.is_dir():
            others = [p.name for p in out.iterdir() if p.name not in OUT_FILES]
            if others:
                raise FedsynthError(
                    f"--out {out} holds other files ({len(others)}): give a new or empty folder "
                    "(it is made owner-only)"
                )
        return cls(**given)  # type: ignore[arg-type]

    @property
    def cohort(self) -> Path:
        """The release's cohort folder (checked against its cohort.sha256 by run_audit)."""
        return self.release / COHORT


@dataclass(frozen=True)
class PublicSizes:
    """How the shared audit publishes the site's subject counts: the node config's rule
    (client/public_size.py), from the audit's own options of the same names."""

    disclose: bool = False  # --disclose-subject-count: the exact counts (opt-in)
    declared: int | None = None  # --public-subjects M: the training set's public size

    def __post_init__(self) -> None:
        if self.disclose and self.declared is not None:
            raise FedsynthError(
                "--disclose-subject-count publishes the exact count, --public-subjects a "
                "declared one: give one"
            )
        if self.declared is not None and self.declared < 1:
            raise FedsynthError("--public-subjects must be at least 1")

    @property
    def mode(self) -> str:
        """The shared audit's `subject_counts`."""
        if self.disclose:
            return "exact"
        return "rounded" if self.declared is None else "declared"

    def training(self, subjects: int) -> int:
        """--data-path's public size; PublicSizeAboveCount when the declared one exceeds
        the real count (the site's own terminal: it names both)."""
        if self.disclose:
            return subjects
        if self.declared is None:
            return publish.public_count(subjects)
        if self.declared > subjects:
            raise PublicSizeAboveCount(
                f"--public-subjects {self.declared} exceeds the {subjects} subjects in "
                "--data-path: the published size must be at most the real count"
            )
        return self.declared

    def holdout(self, subjects: int) -> int:
        """--holdout's public size: exact when disclosed, else rounded down."""
        return subjects if self.disclose else publish.public_count(subjects)


@dataclass(frozen=True)
class VolumeSet:
    """A folder's usable volumes at the model's resolution, grouped by subject."""

    volumes: torch.Tensor  # (N, 1, H, W, D) in [0, 1]
    attributes: torch.Tensor  # (N, A) scaled to [0, 1] by the declared ranges
    subjects: torch.Tensor  # (N,) subject index 0..S-1
    subject_ids: list[str]  # (S,) as the manifest names them
    images: list[Path]  # (N,)

    @property
    def n_subjects(self) -> int:
        return len(self.subject_ids)


def read_volumes(
    folder: Path, data_cfg: DataConfig, option: str, show_progress: bool
) -> tuple[VolumeSet, SiteManifest]:
    """A folder read as a site (open_site); errors are prefixed with the option's name."""
    try:
        dataset, manifest = open_site(folder, data_cfg, show_progress=show_progress)
    except FedsynthError as exc:
        raise FedsynthError(f"{option}: {exc}") from None
    items = [dataset[i] for i in progress(range(len(dataset)), f"read {option}", show_progress)]
    subjects = torch.empty(len(dataset), dtype=torch.long)
    for s, rows in enumerate(dataset.subject_rows):
        subjects[rows] = s
    volumes = VolumeSet(
        volumes=torch.stack([v for v, _ in items]),
        attributes=torch.stack([a for _, a in items]),
        subjects=subjects,
        subject_ids=list(manifest.subjects()),
        images=[r.image for r in manifest.records],
    )
    return volumes, manifest


def _frame_shape(image: Path) -> tuple[int, ...] | None:
    """A volume's shape in the short-axis frame, from its header alone (None: unreadable,
    left to the full read to reject with its reason)."""
    try:
        header, _ = open_nifti(image)
        shape = header.shape[:3]
        ornt = short_axis_ornt(header.affine, shape)
    except FedsynthError:
        return None
    frame = [0, 0, 0]
    for axis, (target, _) in enumerate(ornt):
        frame[int(target)] = shape[axis]
    return tuple(frame)


def check_cohort(folder: Path, data_cfg: DataConfig) -> None:
    """Every cohort volume stored at the model's resolution: a cohort sampled with another
    config would be silently resampled by the reader, and its distances would not be those
    of the model audited. Headers only, before any volume is read."""
    expected = tuple(data_cfg.shape)
    for record in _manifest(folder, data_cfg, "--release").records:
        shape = _frame_shape(record.image)
        if shape is not None and shape != expected:
            found, model = "x".join(map(str, shape)), "x".join(map(str, expected))
            raise FedsynthError(
                f"--release: {record.image.name} is {found} but the model's resolution is "
                f"{model}: audit a cohort with the config (--checkpoint) it was sampled with"
            )


def check_complete(manifest: SiteManifest) -> None:
    """A cohort is audited whole: an unusable row would drop a volume from the audit."""
    if manifest.rejected:
        first = manifest.rejected[0]
        raise FedsynthError(
            f"--release: {len(manifest.rejected)} row(s) unusable (e.g. row {first.row}, "
            f"{first.file}: {first.reason})"
        )


def _manifest(folder: Path, data_cfg: DataConfig, option: str) -> SiteManifest:
    """A folder's manifest rows, images not yet read; refuses one without usable rows."""
    try:
        manifest = check_site(folder, data_cfg, read_images=False, show_progress=False)
    except FedsynthError as exc:
        raise FedsynthError(f"{option}: {exc}") from None
    if not manifest.records:
        raise FedsynthError(f"{option}: no usable rows in {folder / MANIFEST}")
    return manifest


def check_disjoint(train_folder: Path, holdout_folder: Path, data_cfg: DataConfig) -> None:
    """Held-out subjects must be ones the model never saw: no shared image or subject id
    (compared normalised), from the manifests alone; then no held-out volume that is a
    training scan under another file or id (its voxels, as site-check compares them within
    a site: scan_match.py). A volume that cannot be read is left to the full read, which
    rejects it with its reason."""
    train = _manifest(train_folder, data_cfg, "--data-path")
    holdout = _manifest(holdout_folder, data_cfg, "--holdout")
    images = {r.image for r in train.records} & {r.image for r in holdout.records}
    subjects = {normalise_id(s) for s in train.subjects()} & {
        normalise_id(s) for s in holdout.subjects()
    }  # "José-001" and "JOSÉ-001" are one person's id (subject_identity.py)
    if images or subjects:
        raise FedsynthError(
            f"--holdout shares {len(images)} image(s) and {len(subjects)} subject id(s) with "
            "--data-path: held-out subjects must be ones the study never trained on"
        )
    shared = _shared_scans(train.records, holdout.records, data_cfg)
    if shared:
        held, trained = shared[0]
        raise FedsynthError(
            f"--holdout holds {len(shared)} training scan(s) under another file or subject id "
            f"(e.g. its row {held.row} has the voxels of --data-path row {trained.row}): "
            "held-out subjects must be ones the study never trained on"
        )


def _shared_scans(
    train: Sequence[Record], holdout: Sequence[Record], data_cfg: DataConfig
) -> list[tuple[Record, Record]]:
    """(held-out row, training row) pairs that hold the same scan (scan_match.py)."""

    def read(path: Path) -> tuple[np.ndarray, np.ndarray]:
        return read_nifti(path, data_cfg.max_voxels)

    scans = ScanIndex(read)
    owners: list[Record] = []
    for record in train:
        try:
            scans.add(views(*read(record.image)), record.image)
        except (FedsynthError, OSError, ValueError):
            continue
        owners.append(record)
    shared = []
    for record in holdout:
        try:
            scan = scans.find(views(*read(record.image)))
        except (FedsynthError, OSError, ValueError):
            continue
        if scan is not None:
            shared.append((record, owners[scan]))
    return shared


# ------------------------------------------------------------------------ distances (DCR)


def rmse_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-voxel RMSE between every volume of `a` (M, ...) and of `b` (N, ...): (M, N)."""
    x, y = a.flatten(1).double(), b.flatten(1).double()
    return torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(x.shape[1])


def subject_distances(synthetic: VolumeSet, records: VolumeSet) -> torch.Tensor:
    """(M, S): each synthetic volume's distance to each subject, its nearest volume's."""
    by_volume = rmse_matrix(synthetic.volumes, records.volumes)
    index = records.subjects.expand_as(by_volume)
    out = by_volume.new_full((by_volume.shape[0], records.n_subjects), math.inf)
    return out.scatter_reduce(1, index, by_volume, reduce="amin")


def closer_share(to_train: torch.Tensor, to_holdout: torch.Tensor, seed: int) -> tuple[float, int]:
    """Share of synthetic volumes closer to a training than to any held-out subject, both sets
    subsampled to the smaller's size (seeded, mean over SHARE_SUBSAMPLES draws; ties 1/2).

    to_train (M, S_t), to_holdout (M, S_h) subject distances. Returns (share, size used).
    """
    k = min(to_train.shape[1], to_holdout.shape[1])
    rng = np.random.default_rng(seed)
    draws = SHARE_SUBSAMPLES if to_train.shape[1] != to_holdout.shape[1] else 1
    shares = []
    for _ in range(draws):
        t = to_train[:, rng.permutation(to_train.shape[1])[:k]].min(dim=1).values
        h = to_holdout[:, rng.permutation(to_holdout.shape[1])[:k]].min(dim=1).values
        shares.append(float(((t < h).double() + 0.5 * (t == h).double()).mean()))
    return float(np.mean(shares)), k


def _quantiles(values: torch.Tensor | None, prefix: str) -> dict[str, float | None]:
    named = {"q05": 0.05, "q25": 0.25, "median": 0.5}
    if values is None:
        return {f"{prefix}_{name}": None for name in named}
    array = values.double().numpy()
    return {f"{prefix}_{name}": float(np.quantile(array, q)) for name, q in named.items()}


@dataclass(frozen=True)
class DcrResult:
    """Exact aggregates (private), and per-volume figures that stay in --out."""

    summary: dict
    nearest_subject: torch.Tensor  # (M,) index of the nearest training subject
    to_train: torch.Tensor  # (M,) DCR to training
    to_holdout: torch.Tensor | None  # (M,)
    nearest_holdout: torch.Tensor | None  # (M,) index of the nearest held-out subject
    nndr: torch.Tensor | None  # (M,)

    def shared(self, train_size: int, holdout_size: int | None) -> dict:
        """The summary as a site may share it (common/audit_publication.py): quantiles as
        means of MIN_RECORDS order statistics from as many distinct subjects, windows
        identical or disjoint, the share over enough volumes and distinct nearest subjects,
        all rounded; else withheld. `train_size`, `holdout_size`: the sets' published
        sizes (None: no held-out set), which alone decide what their counts allow; the
        share's set size is the smaller of them."""
        nearest = self.nearest_subject.numpy()
        to_train = self.to_train.double().numpy()
        out = publish.quantiles(to_train, nearest, "train", train_size)
        holdout = None if self.to_holdout is None else self.to_holdout.double().numpy()
        near_holdout = None if self.nearest_holdout is None else self.nearest_holdout.numpy()
        out |= publish.quantiles(holdout, near_holdout, "holdout", holdout_size)
        size = None if holdout_size is None else min(train_size, holdout_size)
        distinct = len(np.unique(nearest))
        if near_holdout is not None:
            distinct = min(distinct, len(np.unique(near_holdout)))
        out["closer_to_training_share"] = publish.share(
            self.summary["closer_to_training_share"], len(nearest), size, distinct
        )
        out["share_subsampled_to"] = size
        nndr = None if self.nndr is None else self.nndr.double().numpy()
        return out | publish.quantiles(nndr, nearest, "nndr", train_size, ("q05", "median"))


def dcr(synthetic: VolumeSet, train: VolumeSet, holdout: VolumeSet | None, seed: int) -> DcrResult:
    """Distances to closest training / held-out subject, the closer-to-training share and
    the nearest-neighbour distance ratio (see the module docstring)."""
    to_train = subject_distances(synthetic, train)
    nearest = to_train.topk(min(2, train.n_subjects), dim=1, largest=False)
    dcr_train = nearest.values[:, 0]
    nndr = None
    if train.n_subjects >= 2:
        nndr = nearest.values[:, 0] / nearest.values[:, 1].clamp_min(1e-12)
    summary: dict = _quantiles(dcr_train, "train")
    dcr_holdout, nearest_holdout, share, size = None, None, None, None
    if holdout is not None:
        to_holdout = subject_distances(synthetic, holdout)
        dcr_holdout, nearest_holdout = to_holdout.min(dim=1)
        share, size = closer_share(to_train, to_holdout, seed)
    summary |= _quantiles(dcr_holdout, "holdout")
    summary |= {"closer_to_training_share": share, "share_subsampled_to": size}
    nndr_q = _quantiles(nndr, "nndr")
    summary |= {"nndr_q05": nndr_q["nndr_q05"], "nndr_median": nndr_q["nndr_median"]}
    return DcrResult(summary, nearest.indices[:, 0], dcr_train, dcr_holdout, nearest_holdout, nndr)


# --------------------------------------------------------------- membership inference


def subject_means(values: torch.Tensor, subjects: torch.Tensor, n: int) -> np.ndarray:
    """(S, ...) mean of per-volume `values` (N, ...) over each subject's volumes."""
    values = values.double()
    sums = torch.zeros((n, *values.shape[1:]), dtype=torch.float64).index_add_(0, subjects, values)
    counts = torch.zeros(n, dtype=torch.float64).index_add_(
        0, subjects, torch.ones(len(subjects), dtype=torch.float64)
    )
    return (sums / counts.reshape(n, *[1] * (values.dim() - 1))).numpy()


def band_means(losses: torch.Tensor, bands: int) -> torch.Tensor:
    """(N, bands) mean of per-draw losses (N, D) over `bands` equal groups of consecutive
    draws; the draws are stratified over the schedule, so group b covers its b-th of
    `bands` equal parts. D must be a multiple of `bands`."""
    n, draws = losses.shape
    return losses.reshape(n, bands, draws // bands).mean(2)


def calibrated_score(reference: np.ndarray, model: np.ndarray) -> np.ndarray:
    """(S,) membership score from per-band losses (S, K) > 0: the mean over the K bands of
    log(reference loss / model loss), each band weighted equally (module docstring)."""
    return np.log(reference / model).mean(axis=1)


def roc_auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """P(member score > non-member score) + P(equal) / 2, i.e. Mann-Whitney U / (n1 n0):
    the trapezoid area under the empirical ROC, whose tied thresholds enter together."""
    fpr, tpr = roc_curve(members, nonmembers)
    return float(np.trapezoid(tpr, fpr))


def roc_curve(members: np.ndarray, nonmembers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Empirical ROC (FPR, TPR), one point per distinct score threshold, from (0, 0);
    "positive" = score >= threshold (Fawcett 2006, algorithm 2)."""
    scores = np.concatenate([members, nonmembers])
    positive = np.concatenate([np.ones(len(members)), np.zeros(len(nonmembers))])
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], positive[order]
    last_of_tie = np.r_[np.diff(scores) != 0, True]  # ties enter together
    tp = np.cumsum(positive)[last_of_tie]
    fp = np.cumsum(1 - positive)[last_of_tie]
    return np.r_[0.0, fp / len(nonmembers)], np.r_[0.0, tp / len(members)]


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """Largest TPR among ROC points whose FPR is at most `target`."""
    return float(tpr[fpr <= target + 1e-12].max())


def attack_metrics(members: np.ndarray, nonmembers: np.ndarray) -> dict:
    """AUC, TPR at 1% and 0.1% FPR, each with its 95% interval (auc_interval; the
    Clopper-Pearson interval of the members flagged), the FPR resolution 1/n_nonmembers
    and what the set sizes leave the figures worth (attack_notes), from the scores of the
    members (n1,) and of the non-members (n0,)."""
    fpr, tpr = roc_curve(members, nonmembers)
    n1, n0 = len(members), len(nonmembers)
    auc = roc_auc(members, nonmembers)
    out = {"auc": auc, **dict(zip(CI_KEYS["auc"], auc_interval(auc, n1, n0), strict=True))}
    for key, target in FPR_TARGETS.items():
        rate = tpr_at_fpr(fpr, tpr, target)
        interval = clopper_pearson(round(rate * n1), n1)
        out |= {key: rate, **dict(zip(CI_KEYS[key], interval, strict=True))}
    return out | {
        "intervals": INTERVALS,
        "fpr_resolution": 1.0 / n0,
        **attack_notes(n1, n0),
        "n_members": n1,
        "n_nonmembers": n0,
    }


def check_reference(model: Pretrained, reference: Pretrained, where: Path) -> None:
    """The reference must encode and condition exactly as the model does: same data config
    and the same frozen autoencoder with the same latent statistics."""
    if reference.config.data != model.config.data:
        raise FedsynthError(f"--reference {where}: its data config differs from --checkpoint's")
    stats = ("latent_mean", "latent_std")
    same_stats = all(reference.metadata.get(k) == model.metadata.get(k) for k in stats)
    ours, theirs = model.autoencoder.state_dict(), reference.autoencoder.state_dict()
    same_weights = ours.keys() == theirs.keys() and all(
        torch.equal(ours[k].cpu(), theirs[k].cpu()) for k in ours
    )
    if not (same_stats and same_weights):
        raise FedsynthError(
            f"--reference {where}: its autoencoder differs from --checkpoint's (the reference "
            "must be the public checkpoint the study started from)"
        )


def membership(
    model: Pretrained,
    reference: Pretrained | None,
    train: VolumeSet,
    holdout: VolumeSet,
    seed: int,
    show_progress: bool,
) -> dict:
    """The loss attack's aggregates (see the module docstring): members = training subjects."""
    encoded = []
    for name, volumes in (("training", train), ("holdout", holdout)):
        rows = progress(volumes.volumes.split(LOSS_BATCH), f"encode {name}", show_progress)
        device = next(model.autoencoder.parameters()).device
        encoded.append(torch.cat([model.encode(v.to(device)).cpu() for v in rows]))

    def subject_losses(unet: ConditionedUNet) -> tuple[np.ndarray, np.ndarray]:
        """Members' (n1, LOSS_BANDS) and non-members' (n0, LOSS_BANDS) losses per band."""
        out = []
        for volumes, latents in zip((train, holdout), encoded, strict=True):
            chunks = torch.arange(len(latents)).split(LOSS_BATCH)
            loss = torch.cat(
                [
                    fixed_noise_draw_losses(
                        unet,
                        model.config.diffusion,
                        latents[rows],
                        volumes.attributes[rows],
                        seed,
                        LOSS_DRAWS,
                    )
                    for rows in progress(chunks, "membership loss", show_progress)
                ]
            )
            bands = band_means(loss, LOSS_BANDS)
            out.append(subject_means(bands, volumes.subjects, volumes.n_subjects))
        return out[0], out[1]

    loss_in, loss_out = subject_losses(model.unet)
    # the mean of equal bands is the mean over the draws
    uncalibrated = attack_metrics(-loss_in.mean(1), -loss_out.mean(1))
    draws = {"loss_draws": LOSS_DRAWS, "loss_bands": LOSS_BANDS}
    if reference is None:
        return {"score": "-model loss", **uncalibrated, **draws, "auc_uncalibrated": None}
    ref_in, ref_out = subject_losses(reference.unet)
    calibrated = attack_metrics(
        calibrated_score(ref_in, loss_in), calibrated_score(ref_out, loss_out)
    )
    return {
        "score": CALIBRATED,
        **calibrated,
        **draws,
        "auc_uncalibrated": uncalibrated["auc"],
    }


# ----------------------------------------------------------------------------- the audit


def load_checkpoint(path: Path, option: str, device: torch.device | str = "cpu") -> Pretrained:
    """load_pretrained, with whatever breaks on a damaged folder as one line naming it."""
    try:
        return load_pretrained(path, device)
    except FedsynthError as exc:
        raise FedsynthError(f"{option}: {exc}") from None
    except (RuntimeError, ValueError, KeyError, TypeError, OSError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FedsynthError(f"{option} {path} does not load: {first}") from None


def write_private_files(
    out: Path,
    report: dict,
    shared: dict,
    result: DcrResult,
    synthetic: VolumeSet,
    train: VolumeSet,
    config: Config,
) -> None:
    """pairs.png, pairs.csv, audit.json (exact) and shared.json in `out` (0700), each
    file 0600."""
    out = private_dir(out)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["synthetic", "nearest_training_subject", "dcr_train", "dcr_holdout", "nndr"])
    for i, image in enumerate(synthetic.images):
        holdout = "" if result.to_holdout is None else f"{float(result.to_holdout[i]):.6g}"
        nndr = "" if result.nndr is None else f"{float(result.nndr[i]):.6g}"
        subject_id = train.subject_ids[int(result.nearest_subject[i])]
        writer.writerow([image.name, subject_id, f"{float(result.to_train[i]):.6g}", holdout, nndr])
    atomic_write_text(out / "pairs.csv", buffer.getvalue())
    volumes, titles = [], []
    for rank, i in enumerate(result.to_train.argsort()[:PAIRS].tolist(), start=1):
        subject = int(result.nearest_subject[i])
        rows = (train.subjects == subject).nonzero().flatten()
        gaps = rmse_matrix(synthetic.volumes[i : i + 1], train.volumes[rows])[0]
        nearest = int(rows[gaps.argmin()])
        volumes += [synthetic.volumes[i, 0].numpy(), train.volumes[nearest, 0].numpy()]
        titles += [
            f"pair {rank}: synthetic {synthetic.images[i].name} (RMSE {float(gaps.min()):.4f})",
            f"pair {rank}: nearest training record {train.subject_ids[subject]} "
            f"({train.images[nearest].name})",
        ]
    # montage writes 0644; inside the 0700 folder nobody else can reach it before the chmod
    montage(out / "pairs.png", volumes, titles, config)
    os.chmod(out / "pairs.png", PRIVATE_MODE)
    atomic_write_text(out / "audit.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / SHARED, json.dumps(shared, indent=2) + "\n")


def run_audit(
    inputs: AuditInputs,
    config: Config | None,
    seed: int = 0,
    show_progress: bool = True,
    sizes: PublicSizes = PublicSizes(),
) -> dict:
    """Check the release's cohort against its hashes, read it and the site's subjects,
    measure, write the private files in inputs.out and return the report a site may share
    (the JSON of the module docstring).

    `config` gives the model's resolution when there is no checkpoint (the checkpoint's
    own config wins otherwise); `sizes` how the subject counts are published. Raises
    FedsynthError with one line on bad input.
    """
    try:
        fingerprint = check_cohort_hashes(inputs.release)
    except FedsynthError as exc:
        raise FedsynthError(f"--release: {exc}") from None
    model = reference = None
    if inputs.checkpoint is not None:
        model = load_checkpoint(inputs.checkpoint, "--checkpoint")
        config = model.config
        device = resolve_device(config.device)
        model.unet.to(device)
        model.autoencoder.to(device)
        if inputs.reference is not None:
            reference = load_checkpoint(inputs.reference, "--reference", device)
            check_reference(model, reference, inputs.reference)
    if config is None:
        raise FedsynthError("no config: give --checkpoint or --config")
    data_cfg = config.data
    check_cohort(inputs.cohort, data_cfg)
    if inputs.holdout is not None:
        check_disjoint(inputs.data_path, inputs.holdout, data_cfg)
    synthetic, cohort = read_volumes(inputs.cohort, data_cfg, "--release", show_progress)
    check_complete(cohort)
    train = read_volumes(inputs.data_path, data_cfg, "--data-path", show_progress)[0]
    holdout = None
    if inputs.holdout is not None:
        holdout = read_volumes(inputs.holdout, data_cfg, "--holdout", show_progress)[0]
    public_train = sizes.training(train.n_subjects)
    public_holdout = None if holdout is None else sizes.holdout(holdout.n_subjects)
    result = dcr(synthetic, train, holdout, seed)
    attack = None
    if model is not None and holdout is not None:
        attack = membership(model, reference, train, holdout, seed, show_progress)
    counts = [len(synthetic.images), public_train]  # as published: the note is shared
    counts += [] if public_holdout is None else [public_holdout]
    few = min(counts) < FEW_SUBJECTS
    report = {
        "outside_dp_guarantee": True,
        "note": NOTE + (" " + FEW_NOTE.format(n=FEW_SUBJECTS).capitalize() + "." if few else ""),
        "distance": DISTANCE,
        "published": {
            "min_records": MIN_RECORDS,
            "significant_digits": publish.SIGNIFICANT_DIGITS,
            "rule": publish.RULE,
        },
        "cohort_sha256": fingerprint,
        "cohort_volumes": len(synthetic.images),
        "training_subjects": public_train,
        "holdout_subjects": public_holdout,
        "subject_counts": sizes.mode,
        "seed": seed,
        "dcr": result.shared(public_train, public_holdout),
        "membership_inference": (
            None
            if attack is None or public_holdout is None
            else publish.attack(attack, public_train, public_holdout, sizes.mode)
        ),
    }
    exact = report | {
        "published": "exact figures: private to the site, share shared.json",
        "training_subjects": train.n_subjects,
        "holdout_subjects": None if holdout is None else holdout.n_subjects,
        "subject_counts": "exact (private)",
        "dcr": result.summary,
        "membership_inference": attack,
    }
    write_private_files(inputs.out, exact, report, result, synthetic, train, config)
    return report


def _number(value: publish.Published | None) -> str:
    """A shared figure as printed: already rounded, or why it is withheld."""
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return f"withheld ({value.removeprefix('withheld: ')})"
    return f"{value:g}"


def _with_interval(mia: dict, key: str) -> str:
    """A shared AUC or TPR as printed, with its 95% interval where that is published."""
    low, high = (mia.get(name) for name in CI_KEYS[key])
    shown = _number(mia[key])
    if isinstance(low, float) and isinstance(high, float):
        return f"{shown} (95% CI {low:g} to {high:g})"
    return shown


def summary_lines(report: dict) -> list[str]:
    """The shared report as a few printed lines: aggregates only, no paths, no subject ids."""
    d = report["dcr"]
    holdout = report["holdout_subjects"]
    lines = [
        "OUTSIDE THE DP GUARANTEE: " + report["note"].split(": ", 1)[1],
        f"cohort: {report['cohort_volumes']} synthetic volumes; training: "
        f"{report['training_subjects']} subjects; held-out: "
        f"{'none given' if holdout is None else f'{holdout} subjects'} (subject counts "
        f"{COUNTS_SHOWN[report['subject_counts']]})",
        f"distance to closest training record ({DISTANCE.split(' (')[0]}): median "
        f"{_number(d['train_median'])}, 5% {_number(d['train_q05'])}, 25% "
        f"{_number(d['train_q25'])}",
    ]
    if holdout is not None:
        lines += [
            f"distance to closest held-out record: median {_number(d['holdout_median'])}, 5% "
            f"{_number(d['holdout_q05'])}, 25% {_number(d['holdout_q25'])}",
            f"closer to a training than to a held-out record: "
            f"{_number(d['closer_to_training_share'])} of the cohort (0.5 expected without "
            f"memorisation; both sets subsampled to the smaller's size, published as "
            f"{d['share_subsampled_to']} subjects)",
        ]
    if d["nndr_median"] is not None:
        lines.append(
            f"nearest / second-nearest training distance: median {_number(d['nndr_median'])}, "
            f"5% {_number(d['nndr_q05'])} (near 0: a near-copy of one record)"
        )
    mia = report["membership_inference"]
    if mia is None:
        lines.append("membership inference: not run (needs --checkpoint and --holdout)")
    else:
        figures = [f"AUC {_with_interval(mia, 'auc')} (0.5: chance)"]
        figures += [f"TPR {_with_interval(mia, k)} at {FPR_WORDS[k]} FPR" for k in FPR_TARGETS]
        lines.append(
            f"membership inference ({mia['score']}, {mia['n_members']} members vs "
            f"{mia['n_nonmembers']} non-members): {', '.join(figures)}"
        )
        notes = (mia.get("fpr_not_resolvable"), mia.get("few_subjects"))
        lines += [f"membership inference: {note}" for note in notes if note]
        if mia.get("intervals"):
            lines.append(f"intervals: {mia['intervals']}")
    lines += [
        f"cohort audited: the release's cohort, fingerprint {report['cohort_sha256']} (check "
        "it against the published report.html)",
        f"shared figures: {report['published']['rule']}",
        f"exact figures, pairs montage and per-pair distances: in --out (owner-only); "
        f"{SHARED} there is what may be shared",
    ]
    return lines
