"""`fedsynth audit`: distances to closest record, the membership attack, the CLI's output.

Phantom subjects of one site profile, drawn with three seeds: members (the "training"
subjects), non-members (held out) and fresh subjects (a cohort of new people). Subject ids
are prefixed per draw: the phantom generator names subjects by index, and the audit
refuses held-out subjects whose ids are training ids. Cohorts are written as a release
writes them (cohort/ and its cohort.sha256): the audit takes only a release's cohort.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.stats import hypergeom

from fedsynth.client.audit import (
    FEW_SUBJECTS,
    LOSS_BANDS,
    LOSS_DRAWS,
    NOTE,
    SHARED,
    DcrResult,
    VolumeSet,
    attack_metrics,
    band_means,
    calibrated_score,
    closer_share,
    dcr,
    read_volumes,
    roc_auc,
    roc_curve,
    subject_distances,
    subject_means,
    summary_lines,
    tpr_at_fpr,
)
from fedsynth.client.dp_trainer import (
    group_by_subject,
    nonprivate_step,
    train_round,
    trainable_parameters,
)
from fedsynth.common.accountant import plan_noise
from fedsynth.common.audit_publication import (
    CALIBRATED,
    INTERVALS,
    MIN_RECORDS,
    PUBLISHED,
    WITHHELD,
    attack,
    attack_notes,
    auc_interval,
    check_shared,
    clopper_pearson,
    count_range,
    public_count,
    quantile,
    quantiles,
    rounded,
    rounded_outward,
    share,
    small_count,
    window_start,
)
from fedsynth.common.checkpoint import UNET, load_pretrained, save_torch
from fedsynth.common.cli import main
from fedsynth.common.cohort_hashes import check_cohort_hashes, write_cohort_hashes
from fedsynth.common.config import Config
from fedsynth.common.errors import FedsynthError
from fedsynth.common.orientation import short_axis_affine
from fedsynth.simulations.phantoms import generate_cohorts

MEMBERS, NONMEMBERS, FRESH = 12, 24, 20  # subjects per draw
HELD_OUT = 100  # non-members of the slow attack test: 1/100 resolves 1% FPR
# full-batch AdamW steps, no DP: against 100 non-members AUC 0.99 and 10 of 12 members
# flagged at 1% FPR (160 steps: AUC 0.76 and 2 of 12, which chance gives with p = 0.03)
OVERFIT_STEPS = 240
DP_EPSILON, DP_STEPS, DP_RATE = 1.0, 20, 0.5
# one DP run is one draw of the noise, shared by every score: its AUC spreads more than the
# null sd of independent scores says, so the DP side is judged on the mean over draws
DP_SEEDS = (1, 2, 3)

pytestmark = pytest.mark.usefixtures("one_thread")

TOP_KEYS = {
    "outside_dp_guarantee",
    "note",
    "distance",
    "published",
    "cohort_sha256",
    "cohort_volumes",
    "training_subjects",
    "holdout_subjects",
    "subject_counts",
    "seed",
    "dcr",
    "membership_inference",
}
DCR_KEYS = {
    "train_q05",
    "train_q25",
    "train_median",
    "holdout_q05",
    "holdout_q25",
    "holdout_median",
    "closer_to_training_share",
    "share_subsampled_to",
    "nndr_q05",
    "nndr_median",
}
MIA_KEYS = {
    "score",
    "auc",
    "tpr_at_1pct_fpr",
    "tpr_at_0_1pct_fpr",
    "fpr_resolution",
    "n_members",
    "n_nonmembers",
    "loss_draws",
    "loss_bands",
    "auc_uncalibrated",
    "auc_ci95_low",
    "auc_ci95_high",
    "tpr_at_1pct_fpr_ci95_low",
    "tpr_at_1pct_fpr_ci95_high",
    "tpr_at_0_1pct_fpr_ci95_low",
    "tpr_at_0_1pct_fpr_ci95_high",
    "intervals",
    "fpr_not_resolvable",
    "few_subjects",
}


# ----------------------------------------------------------------------------- helpers


def rewrite_manifest(folder: Path, prefix: str, ed_only: bool = False) -> None:
    """Prefix the subject ids (disjoint draws); optionally keep the ED rows only."""
    with (folder / "manifest.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    kept = [r | {"subject": f"{prefix}-{r['subject']}"} for r in rows]
    kept = [r for r in kept if r["phase"] == "0"] if ed_only else kept
    with (folder / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(kept)


def write_cohort(folder: Path, volumes: torch.Tensor, source: VolumeSet, config: Config) -> Path:
    """Volumes (N, 1, H, W, D) at the model's resolution as a cohort folder, as `fedsynth
    sample` writes one (short-axis affine, manifest with image, subject and attributes),
    each with the attributes of the `source` volume it came from."""
    folder.mkdir(parents=True)
    names = [a.name for a in config.data.attributes]
    lines = [",".join(["image", "subject", *names])]
    for i, volume in enumerate(volumes[:, 0].numpy()):
        image = f"syn-{i + 1:04d}.nii.gz"
        affine = short_axis_affine(tuple(config.data.spacing), volume.shape)
        nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), folder / image)
        values = []
        for k, a in enumerate(config.data.attributes):
            value = a.min + float(source.attributes[i, k]) * (a.max - a.min)
            values.append(round(value) if a.discrete else value)
        lines.append(",".join([image, image.removesuffix(".nii.gz"), *map(repr, values)]))
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    return folder


def write_release(folder: Path, volumes: torch.Tensor, source: VolumeSet, config: Config) -> Path:
    """A release-like folder: the cohort (write_cohort) in folder/cohort, the release's
    record of its hashes and a privacy.json naming the study and the record's fingerprint,
    as `fedsynth release` writes them."""
    write_cohort(folder / "cohort", volumes, source, config)
    fingerprint = write_cohort_hashes(folder)
    statement = {"study_id": "study-audit", "cohort_sha256": fingerprint}
    (folder / "privacy.json").write_text(json.dumps(statement))
    return folder


def assert_shareable(report: dict) -> None:
    """Every figure of a shared report rounded or withheld, as `release --audit` checks."""
    figures = [*report["dcr"].values(), *(report["membership_inference"] or {}).values()]
    for value in figures:
        if isinstance(value, float):
            assert rounded(value) == value
        elif isinstance(value, str):
            texts = (CALIBRATED, "-model loss", INTERVALS)
            assert value.startswith((WITHHELD, "not resolvable", "fewer than")) or value in texts
    check_shared(report, "test")


def checkpoint_with(unet: torch.nn.Module, base: Path, out: Path) -> Path:
    """A copy of checkpoint `base` with these UNet weights (a study's final model)."""
    shutil.copytree(base, out)
    save_torch(out / UNET, unet.state_dict())
    return out


def chance_tail(flagged: int, n1: int, n0: int, fpr: float) -> float:
    """P(at least `flagged` of n1 members above the threshold at FPR `fpr` of n0 non-members)
    when scores do not depend on membership (exchangeable, no ties): the threshold lets
    f = floor(fpr n0) non-members through, and at least k members pass iff the k + f
    highest scores hold at most f non-members (hypergeometric)."""
    f = math.floor(fpr * n0 + 1e-9)
    return float(hypergeom.cdf(f, n1 + n0, n0, flagged + f))


def null_sd(n1: int, n0: int) -> float:
    """Standard deviation of the AUC (Mann-Whitney U / n1 n0) when scores do not depend on
    membership (Hanley & McNeil 1982; no ties)."""
    return math.sqrt((n1 + n0 + 1) / (12 * n1 * n0))


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_checkpoint) -> dict:
    """Members, non-members and fresh subjects of site-1's profile, read at the model's
    resolution; ED-only copies of members and non-members for the membership attack."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("audit")
    config = load_pretrained(tiny_checkpoint).config
    folders = {}
    for name, seed, n in (
        ("members", 31, MEMBERS),
        ("nonmembers", 32, NONMEMBERS),
        ("fresh", 33, FRESH),
    ):
        generate_cohorts(
            root / name, sites=1, subjects=n, seed=seed, public_subjects=1, progress=False
        )
        folders[name] = root / name / "site-1"
        rewrite_manifest(folders[name], name)
    for name in ("members", "nonmembers"):
        shutil.copytree(folders[name], root / f"{name}-ed")
        folders[f"{name}-ed"] = root / f"{name}-ed"
        rewrite_manifest(folders[f"{name}-ed"], "ed", ed_only=True)
    sets = {
        name: read_volumes(folders[name], config.data, name, show_progress=False)[0]
        for name in ("members", "nonmembers", "fresh", "members-ed")
    }
    torch.set_num_threads(threads)
    return {"root": root, "folders": folders, "sets": sets, "config": config}


@pytest.fixture(scope="module")
def held_out(site) -> Path:
    """HELD_OUT non-members of the same profile, ED only, for the slow attack test."""
    root = site["root"] / "held-out"
    generate_cohorts(root, sites=1, subjects=HELD_OUT, seed=34, public_subjects=1, progress=False)
    rewrite_manifest(root / "site-1", "held", ed_only=True)
    return root / "site-1"


@pytest.fixture(scope="module")
def cohorts(site) -> dict[str, Path]:
    """Releases of: near-copies of the members' volumes, fresh subjects, a small one of
    fresh subjects (for audits that look at the model, not at the cohort) and one of five
    (an odd count: its median is one volume's distance)."""
    sets, config, root = site["sets"], site["config"], site["root"]
    members, fresh = sets["members"], sets["fresh"]
    noise = 0.02 * torch.randn(members.volumes.shape, generator=torch.Generator().manual_seed(5))
    copies = (members.volumes + noise).clamp(0, 1)
    return {
        "copies": write_release(root / "release-copies", copies, members, config),
        "fresh": write_release(root / "release-fresh", fresh.volumes, fresh, config),
        "small": write_release(root / "release-small", fresh.volumes[:4], fresh, config),
        "five": write_release(root / "release-five", fresh.volumes[:5], fresh, config),
    }


@pytest.fixture(scope="module")
def models(site, tiny_checkpoint) -> dict[str, Path]:
    """Two finetunes of the tiny checkpoint on the ED volumes of the members: one overfitted
    (every member every step, no clipping or noise, the whole UNet, a high learning rate)
    and three with the project's DP-SGD trainer at epsilon 1 (three draws of the noise)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train = site["sets"]["members-ed"]
    root = site["root"]
    base = load_pretrained(tiny_checkpoint)
    latents = base.encode(train.volumes)

    overfit = load_pretrained(tiny_checkpoint)
    config = overfit.config
    config = dataclasses.replace(
        config, privacy=dataclasses.replace(config.privacy, max_physical_batch_size=64)
    )
    data = group_by_subject(latents, train.attributes, train.subjects)
    optimizer = torch.optim.AdamW(trainable_parameters(overfit.unet, "all"), lr=3e-3)
    overfit.unet.train()
    generator = torch.Generator().manual_seed(0)
    everyone = torch.arange(data.n_subjects)
    for _ in range(OVERFIT_STEPS):
        nonprivate_step(overfit.unet, optimizer, data, everyone, config, generator, "cpu")

    sigma = plan_noise(DP_EPSILON, 1e-5, DP_RATE, DP_STEPS)
    private = {}
    for seed in DP_SEEDS:
        model = load_pretrained(tiny_checkpoint)
        train_round(
            model.unet,
            latents,
            train.attributes,
            train.subjects,
            model.config,
            sigma,
            DP_RATE,
            DP_STEPS,
            seed=seed,
        )
        private[f"dp-{seed}"] = checkpoint_with(
            model.unet, tiny_checkpoint, root / f"ckpt-dp{seed}"
        )
    torch.set_num_threads(threads)
    return {
        "overfit": checkpoint_with(overfit.unet, tiny_checkpoint, root / "ckpt-overfit"),
        **private,
    }


def audit_json(capsys, *args: str) -> dict:
    assert main(["audit", *args, "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out)


# --------------------------------------------------------------------------- metrics


def test_roc_metrics_on_a_hand_worked_example():
    members, nonmembers = np.array([3.0, 2.0, 0.5]), np.array([1.0, 0.0])
    # pairs member > non-member: (3,1) (3,0) (2,1) (2,0) (0.5,0); (0.5,1) is lost
    assert roc_auc(members, nonmembers) == pytest.approx(5 / 6)
    assert roc_auc(nonmembers, members) == pytest.approx(1 / 6)  # swapped roles
    assert roc_auc(np.array([1.0, 1.0]), np.array([1.0])) == pytest.approx(0.5)  # ties: 1/2
    fpr, tpr = roc_curve(members, nonmembers)
    assert fpr.tolist() == [0, 0, 0, 0.5, 0.5, 1]
    assert tpr.tolist() == pytest.approx([0, 1 / 3, 2 / 3, 2 / 3, 1, 1])
    assert tpr_at_fpr(fpr, tpr, 0.01) == pytest.approx(2 / 3)  # before the first false one
    assert tpr_at_fpr(fpr, tpr, 0.5) == pytest.approx(1.0)
    metrics = attack_metrics(members, nonmembers)
    assert metrics["fpr_resolution"] == 0.5
    assert (metrics["n_members"], metrics["n_nonmembers"]) == (3, 2)
    # the trapezoid area under the empirical ROC is the same AUC
    assert np.trapezoid(tpr, fpr) == pytest.approx(5 / 6)
    # 2 of 3 members flagged: Clopper-Pearson's upper bound solves P(X <= 2 | p) = 0.025,
    # p^3 = 0.975; the lower P(X >= 2 | p) = 3p^2 - 2p^3 = 0.025
    low, high = metrics["tpr_at_1pct_fpr_ci95_low"], metrics["tpr_at_1pct_fpr_ci95_high"]
    assert high == pytest.approx(0.975 ** (1 / 3)) and 3 * low**2 - 2 * low**3 == pytest.approx(
        0.025
    )
    interval = (metrics["auc_ci95_low"], metrics["auc_ci95_high"])
    assert interval == pytest.approx(auc_interval(5 / 6, 3, 2))
    assert metrics["fpr_not_resolvable"].startswith("not resolvable: the TPR at 1% FPR and at")
    assert metrics["few_subjects"].startswith("fewer than 30 subjects on a side (3 members and")


def test_the_calibrated_score_is_the_mean_log_ratio_over_equal_bands():
    """8 draws in 4 bands of 2 consecutive draws; a subject's band loss is the mean over its
    volumes; the score weights the bands' log(reference / model) equally."""
    draws = torch.tensor([[1.0, 3.0, 2.0, 2.0, 4.0, 0.0, 5.0, 7.0]])
    assert band_means(draws, 4).tolist() == [[2.0, 2.0, 2.0, 6.0]]
    assert band_means(draws, 2).tolist() == [[2.0, 4.0]]
    per_volume = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 5.0]])
    means = subject_means(per_volume, torch.tensor([0, 0, 1]), 2)
    assert means.tolist() == [[2.0, 4.0], [5.0, 5.0]]
    # A: half the reference's loss in the low band, the same in the high one; B: the same
    # low, 9/10 of it high. Ratios rank A first, differences (0.25 and 0.5) would rank B
    reference = np.array([[1.0, 10.0], [1.0, 10.0]])
    model = np.array([[0.5, 10.0], [1.0, 9.0]])
    score = calibrated_score(reference, model)
    assert score == pytest.approx([math.log(2) / 2, math.log(10 / 9) / 2])
    assert calibrated_score(np.array([[2.0, 8.0]]), np.array([[1.0, 2.0]])) == pytest.approx(
        [1.5 * math.log(2)]  # (log 2 + log 4) / 2
    )
    assert calibrated_score(model, model).tolist() == [0.0, 0.0]  # its own reference: chance


def test_intervals_on_hand_worked_numbers():
    """Clopper-Pearson at 0 and n of n and at 1 of n in closed form (1 - (1 - p)^n = 0.025),
    else against scipy's binomial root-finding; the AUC's Hanley & McNeil interval at 0.5
    over 12 x 24 (Q1 = Q2 = 1/3: variance (1/4 + 34/12) / 288 = 37/3456) and at 0.8 over
    40 x 100 (Q1 = 2/3, Q2 = 0.71111: variance 0.013744 / 40)."""
    from scipy.stats import binomtest

    assert clopper_pearson(0, 20) == (0.0, pytest.approx(0.168, abs=5e-4))
    assert clopper_pearson(0, 20)[1] == pytest.approx(1 - 0.025 ** (1 / 20))
    assert clopper_pearson(20, 20) == (pytest.approx(0.025 ** (1 / 20)), 1.0)
    assert clopper_pearson(1, 12)[0] == pytest.approx(1 - 0.975 ** (1 / 12))  # 0.0021
    exact = binomtest(5, 12).proportion_ci(0.95, method="exact")
    assert clopper_pearson(5, 12) == pytest.approx((exact.low, exact.high))
    half = 1.959964 * math.sqrt(37 / 3456)  # 0.203
    assert auc_interval(0.5, 12, 24) == pytest.approx((0.5 - half, 0.5 + half))
    low, high = auc_interval(0.8, 40, 100)
    variance = (0.16 + 39 * (2 / 3 - 0.64) + 99 * (1.28 / 1.8 - 0.64)) / 4000
    assert (high - low) / 2 == pytest.approx(1.959964 * math.sqrt(variance))
    assert auc_interval(0.99, 12, 24)[1] == 1.0 and auc_interval(1.0, 12, 24) == (1.0, 1.0)
    # bounds rounded outward to 2 significant digits, so the interval still covers
    assert rounded_outward(0.0434, 0.0436) == (0.043, 0.044)
    assert rounded_outward(0.5 - half, 0.5 + half) == (0.29, 0.71)
    assert rounded_outward(0.0, 0.9951) == (0.0, 1.0)


def test_what_the_set_sizes_leave_resolvable_is_said_in_words():
    """1/n non-members is the smallest non-zero FPR: 100 resolve 1% but not 0.1%, 1000
    both, 99 neither; a side under 30 subjects is named."""
    assert attack_notes(30, 1000) == {"fpr_not_resolvable": None, "few_subjects": None}
    notes = attack_notes(30, 100)
    assert notes["fpr_not_resolvable"] == (
        "not resolvable: the TPR at 0.1% FPR; with 100 non-members the smallest non-zero "
        "FPR is 1/100 = 0.01, so a TPR there is the TPR at zero false positives"
    )
    assert notes["few_subjects"] is None
    notes = attack_notes(29, 99)
    assert notes["fpr_not_resolvable"].startswith(
        "not resolvable: the TPR at 1% FPR and at 0.1% FPR; with 99 non-members"
    )
    assert notes["few_subjects"] == (
        "fewer than 30 subjects on a side (29 members): the AUC and TPRs mean little"
    )


def test_subject_distance_is_the_nearest_of_its_volumes():
    def volumes(values):
        return torch.tensor(values, dtype=torch.float32).view(-1, 1, 2, 1, 1)

    synthetic = VolumeSet(
        volumes([[0.0, 0.0]]), torch.zeros(1, 1), torch.tensor([0]), ["s"], [Path("s")]
    )
    # subject 0: volumes at RMSE 1.0 and 0.5; subject 1: one volume at RMSE 0.25
    records = VolumeSet(
        volumes([[1.0, 1.0], [0.5, 0.5], [0.25, 0.25]]),
        torch.zeros(3, 1),
        torch.tensor([0, 0, 1]),
        ["a", "b"],
        [Path("x")] * 3,
    )
    assert subject_distances(synthetic, records).tolist() == [[0.5, 0.25]]


def test_closer_share_subsamples_the_larger_set():
    # three synthetic volumes: two lie nearer the training subject, one nearer held-out ones
    to_train = torch.tensor([[0.1], [0.1], [0.9]])
    to_holdout = torch.tensor([[0.5, 0.5, 0.5, 0.5]] * 2 + [[0.2, 0.2, 0.2, 0.2]])
    share, size = closer_share(to_train, to_holdout, seed=0)
    assert (share, size) == (pytest.approx(2 / 3), 1)
    tie = closer_share(torch.tensor([[0.3]]), torch.tensor([[0.3]]), seed=0)
    assert tie == (0.5, 1)


# ------------------------------------------------------------------------------- DCR


def test_near_copies_of_training_volumes_are_flagged(site, cohorts):
    sets = site["sets"]
    synthetic = read_volumes(cohorts["copies"] / "cohort", site["config"].data, "c", False)[0]
    result = dcr(synthetic, sets["members"], sets["nonmembers"], seed=0)
    d = result.summary
    assert d["closer_to_training_share"] == 1.0
    assert d["share_subsampled_to"] == MEMBERS
    assert d["train_median"] < 0.05 < d["holdout_median"]  # the added noise is 0.02
    assert d["nndr_median"] < 0.35
    # each copy's nearest training subject is the one it was copied from
    assert result.nearest_subject.tolist() == sets["members"].subjects.tolist()


def test_fresh_subjects_sit_between_training_and_holdout(site, cohorts):
    sets = site["sets"]
    synthetic = read_volumes(cohorts["fresh"] / "cohort", site["config"].data, "c", False)[0]
    assert len(synthetic.images) == 2 * FRESH
    result = dcr(synthetic, sets["members"], sets["nonmembers"], seed=0)
    d = result.summary
    # no near-copies: a fresh volume is about as far from its nearest as from the next
    assert d["nndr_median"] > 0.8
    assert d["train_median"] > 0.05 and d["holdout_median"] > 0.05
    assert 0.35 <= d["closer_to_training_share"] <= 0.65
    # without subsampling, the twice as large held-out set wins most volumes (about 1/3
    # go to training): the correction is what brings the share to 0.5
    raw = (result.to_train < result.to_holdout).double().mean()
    assert raw < d["closer_to_training_share"] - 0.1


# --------------------------------------------------------------------------- the CLI


def test_cli_writes_private_pairs_and_prints_aggregates_only(site, cohorts, tmp_path, capsys):
    folders = site["folders"]
    out = tmp_path / "audit-out"
    args = [
        "--release",
        str(cohorts["copies"]),
        "--data-path",
        str(folders["members"]),
        "--holdout",
        str(folders["nonmembers"]),
        "--out",
        str(out),
        "--config",
        "tiny",
    ]
    assert main(["audit", *args, "--quiet"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / SHARED).read_text())  # what --json prints
    exact = json.loads((out / "audit.json").read_text())  # private
    assert set(report) == TOP_KEYS and set(report["dcr"]) == DCR_KEYS
    assert report["outside_dp_guarantee"] is True and report["note"].startswith(NOTE)
    few = min(2 * MEMBERS, MEMBERS, NONMEMBERS) < FEW_SUBJECTS
    assert ("few records" in report["note"].lower()) is few
    assert report["membership_inference"] is None  # no checkpoint
    # 24 volumes, 12 training subjects published as 10 (10 to 19): withheld on the
    # published size, as it would be for 10 subjects (the distinct-subject gate: below)
    assert report["dcr"]["closer_to_training_share"] == (
        f"{WITHHELD} {MIN_RECORDS} subjects per set as published"
    )
    assert (
        report["dcr"]["train_median"]
        == f"{WITHHELD} {MIN_RECORDS} subjects in the set as published"
    )
    assert exact["dcr"]["closer_to_training_share"] == 1.0
    assert exact["dcr"]["train_median"] < 0.05  # the exact figures stay in --out
    assert_shareable(report)
    # the site's counts as its public sizes (12 -> 10, 24 -> 20), as its node config does
    assert (report["cohort_volumes"], report["training_subjects"]) == (2 * MEMBERS, 10)
    assert (report["holdout_subjects"], report["subject_counts"]) == (20, "rounded")
    assert report["dcr"]["share_subsampled_to"] == 10
    assert (exact["training_subjects"], exact["holdout_subjects"]) == (MEMBERS, NONMEMBERS)
    assert report["cohort_sha256"] in printed
    assert "OUTSIDE THE DP GUARANTEE" in printed and "subjects per set as published) of" in printed
    text = printed + json.dumps(report)
    assert "sub-0" not in text and ".nii" not in text and str(site["root"]) not in text
    assert str(out) not in text and str(tmp_path) not in text
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for name in ("pairs.png", "pairs.csv", "audit.json", SHARED):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600
    assert (out / "pairs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with (out / "pairs.csv").open() as f:
        pairs = list(csv.DictReader(f))
    assert len(pairs) == 2 * MEMBERS  # per-pair values stay here, with the subject ids
    assert pairs[0]["nearest_training_subject"] == site["sets"]["members"].subject_ids[0]


def refusal(capsys, *args: str) -> str:
    assert main(["audit", *args, "--quiet"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedsynth audit: error: ")
    assert "Traceback" not in captured.err
    return lines[0]


def test_cli_refuses_bad_input_in_one_line(site, cohorts, tmp_path, tiny_checkpoint, capsys):
    folders, config = site["folders"], site["config"]
    good = [
        "--release",
        str(cohorts["fresh"]),
        "--data-path",
        str(folders["members"]),
        "--config",
        "tiny",
    ]

    def run(*extra: str, out: str = "") -> str:
        return refusal(capsys, *good, *extra, "--out", out or str(tmp_path / "out"))

    assert "--release" in refusal(
        capsys, "--release", str(tmp_path / "none"), "--data-path", str(folders["members"])
    )
    assert "--holdout" in run("--holdout", str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.csv").write_text(
        "image,subject," + ",".join(a.name for a in config.data.attributes) + "\n"
    )
    assert "--holdout: no usable rows" in run("--holdout", str(empty))
    assert "subject id(s) with --data-path" in run("--holdout", str(folders["members"]))

    small = site["sets"]["fresh"]
    small_volumes = torch.nn.functional.interpolate(small.volumes[:2], size=(16, 16, 8))
    wrong = write_release(tmp_path / "wrong-shape", small_volumes, small, config)
    line = refusal(
        capsys,
        "--release",
        str(wrong),
        "--data-path",
        str(folders["members"]),
        "--config",
        "tiny",
        "--out",
        str(tmp_path / "o2"),
    )
    assert "16x16x8 but the model's resolution is 32x32x8" in line

    broken = tmp_path / "broken-ckpt"
    shutil.copytree(tiny_checkpoint, broken)
    save_torch(broken / UNET, {"not": torch.zeros(1)})
    assert "--checkpoint" in run(
        "--checkpoint", str(broken), "--holdout", str(folders["nonmembers"])
    )
    assert "give both" in run("--reference", str(tiny_checkpoint))
    crowded = tmp_path / "crowded"
    crowded.mkdir()
    (crowded / "notes.txt").write_text("x")
    assert "holds other files" in run(out=str(crowded))
    assert (crowded / "notes.txt").read_text() == "x"


# ----------------------------------------------------------- the attack (issue 13 done)


def test_cli_attack_on_a_model_that_is_its_own_reference(
    site, cohorts, tiny_checkpoint, tmp_path, capsys
):
    """Calibrated scores are then exactly 0 for everyone: chance, whatever the losses."""
    folders = site["folders"]
    report = audit_json(
        capsys,
        "--release",
        str(cohorts["small"]),
        "--data-path",
        str(folders["members-ed"]),
        "--holdout",
        str(folders["nonmembers-ed"]),
        "--checkpoint",
        str(tiny_checkpoint),
        "--reference",
        str(tiny_checkpoint),
        "--out",
        str(tmp_path / "self"),
    )
    assert set(report) == TOP_KEYS and report["cohort_volumes"] == 4
    mia = report["membership_inference"]
    assert set(mia) == MIA_KEYS and mia["score"] == CALIBRATED
    # 12 members publish 10, which may be 10 members: withheld (0.5 in --out: all tied)
    assert mia["auc"] == mia["auc_uncalibrated"] == f"{WITHHELD} 11 members or non-members"
    assert mia["auc_ci95_low"] == mia["auc_ci95_high"] == mia["auc"]  # withheld with it
    # 1% of 24 non-members is not 11: the TPR would rest on one non-member's score
    assert mia["tpr_at_1pct_fpr"].startswith(WITHHELD)
    assert mia["tpr_at_0_1pct_fpr"].startswith(WITHHELD)
    assert mia["tpr_at_1pct_fpr_ci95_high"] == mia["tpr_at_1pct_fpr"]
    # 1/20 resolves neither FPR; 10 and 20 are under 30: said in words, from the public sizes
    assert mia["fpr_not_resolvable"] == (
        "not resolvable: the TPR at 1% FPR and at 0.1% FPR; with 20 non-members the smallest "
        "non-zero FPR is 1/20 = 0.05, so a TPR there is the TPR at zero false positives"
    )
    assert mia["few_subjects"] == (
        "fewer than 30 subjects on a side (10 members and 20 non-members): the AUC and TPRs "
        "mean little"
    )
    exact = json.loads((tmp_path / "self" / "audit.json").read_text())["membership_inference"]
    assert exact["tpr_at_1pct_fpr"] == exact["tpr_at_0_1pct_fpr"] == 0.0
    assert exact["auc"] == 0.5 and 0 <= exact["auc_uncalibrated"] <= 1
    # the exact intervals, private: 0 of 12 members flagged; 0.5 over 12 x 24
    assert exact["tpr_at_1pct_fpr_ci95_high"] == pytest.approx(1 - 0.025 ** (1 / 12))
    assert exact["auc_ci95_low"] < 0.5 < exact["auc_ci95_high"]
    assert "1/24" in exact["fpr_not_resolvable"] and "12 members" in exact["few_subjects"]
    assert (mia["n_members"], mia["n_nonmembers"]) == (10, 20)  # public sizes
    assert mia["fpr_resolution"] == rounded(1 / 20)
    assert (mia["loss_draws"], mia["loss_bands"]) == (LOSS_DRAWS, LOSS_BANDS)
    assert_shareable(report)
    printed = "\n".join(summary_lines(report))
    assert "not resolvable: the TPR at 1% FPR and at 0.1% FPR" in printed
    assert "fewer than 30 subjects on a side" in printed


@pytest.mark.slow  # ~90 s on one thread: 240 training steps, three DP rounds, four audits
def test_attack_separates_an_overfitted_model_from_a_dp_one(
    site, held_out, cohorts, models, tiny_checkpoint, tmp_path, capsys
):
    """12 members against HELD_OUT = 100 non-members: 1% FPR is resolvable (at most one
    non-member above the threshold), 0.1% is not."""
    folders = site["folders"]
    common = [
        "--release",
        str(cohorts["small"]),
        "--data-path",
        str(folders["members-ed"]),
        "--holdout",
        str(held_out),
        "--reference",
        str(tiny_checkpoint),
    ]
    report = audit_json(
        capsys, *common, "--checkpoint", str(models["overfit"]), "--out", str(tmp_path / "a")
    )
    assert set(report) == TOP_KEYS and report["outside_dp_guarantee"] is True
    overfit = report["membership_inference"]
    dp = [
        audit_json(
            capsys,
            *common,
            "--checkpoint",
            str(models[f"dp-{seed}"]),
            "--out",
            str(tmp_path / f"b{seed}"),
        )["membership_inference"]
        for seed in DP_SEEDS
    ]
    assert set(overfit) == MIA_KEYS and overfit["score"] == CALIBRATED
    assert (overfit["n_members"], overfit["n_nonmembers"]) == (10, HELD_OUT)  # public sizes
    assert overfit["loss_draws"] == LOSS_DRAWS
    assert overfit["fpr_resolution"] == rounded(1 / HELD_OUT)
    assert overfit["fpr_not_resolvable"].startswith("not resolvable: the TPR at 0.1% FPR;")
    # 12 members publish 10, which may be 10: the shared AUCs are withheld, the private
    # files have them
    assert {overfit["auc"], *(d["auc"] for d in dp)} == {f"{WITHHELD} 11 members or non-members"}

    def private(name: str) -> dict:
        return json.loads((tmp_path / name / "audit.json").read_text())["membership_inference"]

    def flagged(mia: dict) -> int:
        return round(mia["tpr_at_1pct_fpr"] * MEMBERS)

    caught, private_dp = private("a"), [private(f"b{seed}") for seed in DP_SEEDS]
    assert caught["fpr_not_resolvable"] == overfit["fpr_not_resolvable"]  # 100 either way
    sd = null_sd(MEMBERS, HELD_OUT)  # about 0.09 here
    assert caught["auc"] >= 0.5 + 2.5 * sd  # far beyond a model that learnt nothing
    assert caught["auc_ci95_low"] > 0.5
    # caught at 1% FPR: so many members flagged that chance (scores independent of
    # membership) gives as many with probability under 0.001 (4 or more of 12 at 1 false
    # positive of 100), and the Clopper-Pearson interval lies above 1%
    assert chance_tail(flagged(caught), MEMBERS, HELD_OUT, 0.01) < 0.001
    assert caught["tpr_at_1pct_fpr_ci95_low"] > 0.01
    dp_auc = float(np.mean([mia["auc"] for mia in private_dp]))
    assert abs(dp_auc - 0.5) <= 1.5 * sd + 0.005  # as a model that learnt nothing of who
    for mia in private_dp:
        # within chance at 1% FPR: as many flagged by chance with probability over 0.01,
        # and an interval that holds 1%; the AUC's interval does not lie above 0.5 (one DP
        # run's AUC may fall below it: its noise draw is shared by every score)
        assert chance_tail(flagged(mia), MEMBERS, HELD_OUT, 0.01) > 0.01
        assert mia["tpr_at_1pct_fpr_ci95_low"] <= 0.01 <= mia["tpr_at_1pct_fpr_ci95_high"]
        assert mia["auc_ci95_low"] <= 0.5
    assert caught["tpr_at_1pct_fpr"] > max(mia["tpr_at_1pct_fpr"] for mia in private_dp)


# ------------------------------------------------------------- what a site may share


def test_a_shared_quantile_is_a_mean_over_enough_records():
    values = np.linspace(0.01, 0.4, 40)
    distinct = np.arange(40)
    # q05 of 40: nearest rank 2, the window of 11 at the low end; the median: rank 20,
    # the 11 order statistics 15..25 (indices 14..24)
    assert quantile(values, distinct, 0.05) == rounded(float(values[:MIN_RECORDS].mean()))
    assert quantile(values, distinct, 0.5) == rounded(float(values[14:25].mean()))
    assert rounded(0.0432178) == 0.043 and rounded(12345.0) == 12000.0
    few = quantile(values[:10], distinct[:10], 0.5)
    assert few == f"{WITHHELD} {MIN_RECORDS} synthetic volumes"
    # 40 volumes near 5 subjects (copies): no window has 11 distinct subjects behind it
    assert quantile(values, distinct % 5, 0.05) == f"{WITHHELD} 11 distinct subjects behind it"


def test_a_small_cohort_publishes_no_single_record_distance(site, cohorts, tmp_path, capsys):
    """Five synthetic volumes against 24 subjects: an exact median of five distances is one
    volume's distance to one patient, which the shared JSON must not carry."""
    folders, config = site["folders"], site["config"]
    out = tmp_path / "five"
    report = audit_json(
        capsys,
        "--release",
        str(cohorts["five"]),
        "--data-path",
        str(folders["nonmembers"]),
        "--config",
        "tiny",
        "--out",
        str(out),
    )
    # each volume's distance to its nearest record, straight from the voxels
    synthetic = read_volumes(cohorts["five"] / "cohort", config.data, "c", False)[0].volumes
    records = site["sets"]["nonmembers"].volumes
    gaps = (synthetic[:, None] - records[None]).double().pow(2).flatten(2).mean(-1).sqrt()
    distances = sorted(gaps.min(dim=1).values.tolist())
    exact = json.loads((out / "audit.json").read_text())["dcr"]
    assert exact["train_median"] == pytest.approx(distances[2], rel=1e-6)  # one record's
    d = report["dcr"]
    for key in ("train_q05", "train_q25", "train_median", "nndr_q05", "nndr_median"):
        assert d[key] == f"{WITHHELD} {MIN_RECORDS} synthetic volumes", key
    shared = json.dumps(report)
    for distance in distances:
        assert f"{distance:.3f}" not in shared and str(distance) not in shared
    # the few-records warning counts the cohort too (24 training subjects would not warn)
    assert report["training_subjects"] == 20 >= FEW_SUBJECTS  # 24, published as 20
    assert "few records" in report["note"].lower()
    assert_shareable(report)


def test_no_two_shared_quantiles_differ_by_fewer_than_11_records():
    """13 volumes of 13 subjects, one a near copy (0.001) of its patient: the q05 window
    (order statistics 0-10) and the median's (1-11) differ by one record, and 11 x their
    difference would be the copy's distance to the 12th volume. Only windows identical or
    disjoint are published, the median first."""
    values = np.array([0.001] + [0.1] * 12)
    shared = quantiles(values, np.arange(13), "train", 13)
    assert shared["train_median"] == rounded(float(values[1:12].mean()))
    for key in ("train_q05", "train_q25"):  # windows 0-10: one record from the median's
        assert shared[key] == f"{WITHHELD} {MIN_RECORDS} records apart from a published " + (
            f"quantile's window ({key.removeprefix('train_')})"
        )
    # 40 volumes: q05 (0-10) and q25 (4-14) overlap, the median's (14-24) is disjoint
    # from q05's: median and q05 published, q25 (one record from the median's) withheld
    spread = quantiles(np.linspace(0.01, 0.4, 40), np.arange(40), "t", 40)
    assert isinstance(spread["t_median"], float) and isinstance(spread["t_q05"], float)
    assert spread["t_q25"].startswith(WITHHELD)
    # the same windows, published: the same figure, nothing to difference
    assert window_start(0.05, 11) == window_start(0.5, 11) == 0
    assert all(
        isinstance(v, float) for v in quantiles(values[1:12], np.arange(11), "x", 11).values()
    )


def _attack(tpr: float, members: int = 50, nonmembers: int = 12000) -> dict:
    return {
        "score": CALIBRATED,
        "auc": 0.51234,
        "auc_uncalibrated": 0.5,
        "tpr_at_1pct_fpr": tpr,
        "tpr_at_0_1pct_fpr": 0.0,
        "fpr_resolution": 1 / nonmembers,
        "n_members": members,
        "n_nonmembers": nonmembers,
        "loss_draws": 8,
    }


@pytest.mark.parametrize(
    ("tpr", "shown"),
    [(1 / 50, False), (10 / 50, False), (45 / 50, False), (11 / 50, True), (1.0, True)],
)
def test_a_rate_is_not_a_count_of_1_to_10_records(tpr, shown):
    """TPR 0.02 of 50 members is one patient flagged; 0.9 leaves 5 unflagged."""
    shared = attack(_attack(tpr))
    assert isinstance(shared["tpr_at_1pct_fpr"], float) is shown, shared["tpr_at_1pct_fpr"]
    assert shared["tpr_at_0_1pct_fpr"] == 0.0  # no member flagged: no cell to suppress
    # the share is a count of volumes over the published cohort size, likewise
    assert isinstance(share(tpr, 50, 40, 40), float) is shown
    assert small_count(tpr, 50) is not shown


def test_the_closer_to_training_share_rests_on_11_distinct_subjects():
    """50 volumes all nearest to one training patient: the share (1.0, "a training record
    is reproduced") would rest on that one patient."""
    m = 50
    distances = torch.full((m,), 0.01, dtype=torch.float64)
    result = DcrResult(
        summary={"closer_to_training_share": 1.0, "share_subsampled_to": 40},
        nearest_subject=torch.zeros(m, dtype=torch.long),
        to_train=distances,
        to_holdout=distances + 0.2,
        nearest_holdout=torch.arange(m) % 40,
        nndr=None,
    )
    shared = result.shared(40, 40)
    assert shared["train_median"] == f"{WITHHELD} 11 distinct subjects behind it"
    assert shared["closer_to_training_share"] == (
        f"{WITHHELD} 11 distinct nearest subjects in a set"
    )
    spread = dataclasses.replace(result, nearest_subject=torch.arange(m) % 12)
    assert spread.shared(40, 40)["closer_to_training_share"] == 1.0


# ------------------------------------------------------- what release --audit accepts


NNDR = {"nndr_q05": 0.41, "nndr_median": 0.83}


def shared_audit(**changes: object) -> dict:
    """A shared audit as fedsynth audit --json writes one (50 volumes, 40 training and
    12000 held-out subjects by default rounding), with `changes`."""
    audit = {
        "outside_dp_guarantee": True,
        "note": NOTE,
        "distance": "per-voxel RMSE",
        "published": PUBLISHED,
        "cohort_sha256": "0" * 64,
        "cohort_volumes": 50,
        "training_subjects": 40,
        "holdout_subjects": 12000,
        "subject_counts": "rounded",
        "seed": 0,
        "dcr": {"train_median": 0.073, "share_subsampled_to": 40} | NNDR,
        "membership_inference": attack(_attack(0.5, 40)),
    }
    return audit | changes


def test_a_shared_audit_carries_only_the_fields_the_rule_knows():
    check_shared(shared_audit(), "audit.json")
    mia = shared_audit()["membership_inference"]
    for audit, field in (
        (shared_audit(dcr={"train_median": 0.073, "train_min": 0.00123456}), "dcr.train_min"),
        (shared_audit(membership_inference=mia | {"scores": [0.1234]}), "inference.scores"),
        (shared_audit(site_subjects=137), "site_subjects"),
        (shared_audit(published=PUBLISHED | {"extra": 1}), "published.extra"),
    ):
        with pytest.raises(FedsynthError, match=rf"{field} is not a field of a shared audit"):
            check_shared(audit, "audit.json")


def test_a_shared_audit_publishes_subject_counts_as_the_site_chose():
    """Exact counts only when the audit says the site disclosed them; the attack's set
    sizes, the share's and the FPR resolution are the published ones."""
    undisclosed = shared_audit(training_subjects=137, holdout_subjects=41)
    undisclosed["dcr"] = undisclosed["dcr"] | {"share_subsampled_to": 41}
    undisclosed["membership_inference"] = attack(_attack(0.5, 137, 41))
    with pytest.raises(FedsynthError, match="training_subjects is not a public size"):
        check_shared(undisclosed, "audit.json")
    check_shared(undisclosed | {"subject_counts": "exact"}, "audit.json")
    declared = undisclosed | {"subject_counts": "declared"}
    with pytest.raises(FedsynthError, match="holdout_subjects is not a public size"):
        check_shared(declared, "audit.json")  # --public-subjects declares the training set's
    with pytest.raises(FedsynthError, match="subject_counts is not one of"):
        check_shared({k: v for k, v in shared_audit().items() if k != "subject_counts"}, "a")
    audit = shared_audit()
    for change, field in (
        ({"n_members": 47}, "n_members"),
        ({"fpr_resolution": rounded(1 / 47)}, "fpr_resolution"),
    ):
        wrong = audit | {"membership_inference": audit["membership_inference"] | change}
        with pytest.raises(FedsynthError, match=field):
            check_shared(wrong, "audit.json")
    with pytest.raises(FedsynthError, match="share_subsampled_to"):
        check_shared(audit | {"dcr": {"share_subsampled_to": 47}}, "audit.json")


def test_shared_intervals_come_from_the_shared_figures_and_sizes():
    """A TPR of 0.5 over members published as 40 (40 to 49): the interval of 20 of 40,
    the same whatever the real count in the bucket; withheld with a withheld figure."""
    exact = [_mia(n, 0.5) for n in (40, 49)]
    shared = [attack(m, 40, 2000) for m in exact]
    keys = ("tpr_at_1pct_fpr_ci95_low", "tpr_at_1pct_fpr_ci95_high")
    assert [shared[0][k] for k in keys] == list(rounded_outward(*clopper_pearson(20, 40)))
    assert [s[k] for s in shared for k in (*keys, "auc_ci95_low", "auc_ci95_high")] == [
        shared[0][k] for k in (*keys, "auc_ci95_low", "auc_ci95_high")
    ] * 2  # 40 and 49 members publish the same
    assert (shared[0]["auc_ci95_low"], shared[0]["auc_ci95_high"]) == rounded_outward(
        *auc_interval(0.61, 40, 2000)
    )
    assert clopper_pearson(20, 40) != clopper_pearson(round(0.5 * 49), 49)  # exact would tell
    # 1% of 2000 published non-members is 20 >= 11; 0.1% is 2: withheld, bounds too
    assert shared[0]["tpr_at_0_1pct_fpr"].startswith(WITHHELD)
    assert shared[0]["tpr_at_0_1pct_fpr_ci95_low"] == shared[0]["tpr_at_0_1pct_fpr"]
    assert shared[0]["fpr_not_resolvable"] is None and shared[0]["few_subjects"] is None
    check_shared(shared_audit(membership_inference=shared[0]) | {"holdout_subjects": 2000}, "a")


def test_a_shared_audit_with_an_interval_or_note_the_rule_does_not_give_is_refused():
    audit = shared_audit()
    mia = audit["membership_inference"]
    assert isinstance(mia["tpr_at_1pct_fpr_ci95_low"], float)  # 0.5 of 40: published
    for change, field in (
        ({"tpr_at_1pct_fpr_ci95_low": clopper_pearson(20, 40)[0]}, "fpr_ci95_low"),  # exact
        ({"tpr_at_1pct_fpr_ci95_high": 0.66}, "fpr_ci95_high"),  # rounded, but not outward
        ({"auc_ci95_low": 0.5}, "auc_ci95_low"),
        # 0 of 40 members flagged at 0.1% FPR: its interval is 0 to 0.089
        ({"tpr_at_0_1pct_fpr_ci95_high": 0.02}, "0_1pct_fpr_ci95_high"),
        ({"few_subjects": "fewer than 30 subjects on a side (37 members)"}, "few_subjects"),
        ({"fpr_not_resolvable": "not resolvable: the TPR at 1% FPR"}, "fpr_not_resolvable"),
        ({"intervals": "95%: 0.4212 to 0.6034"}, "intervals"),
        ({"loss_bands": "4"}, "loss_bands"),
    ):
        with pytest.raises(FedsynthError, match=field):
            check_shared(audit | {"membership_inference": mia | change}, "audit.json")
    # the interval of a figure the rule withholds is withheld: a number there is refused
    ten = shared_audit(training_subjects=10)
    ten["dcr"] = {"share_subsampled_to": 10} | {
        k: f"{WITHHELD} {MIN_RECORDS} subjects in the set as published"
        for k in ("train_median", "nndr_q05", "nndr_median")
    }
    ten["membership_inference"] = attack(_attack(0.0, 10), 10, 12000)
    assert ten["membership_inference"]["auc_ci95_high"].startswith(WITHHELD)
    check_shared(ten, "audit.json")
    ten["membership_inference"] |= {"auc_ci95_high": 0.62}
    with pytest.raises(FedsynthError, match=r"auc_ci95_high is not the interval"):
        check_shared(ten, "audit.json")
    # 2 of 40 members flagged: the TPR is withheld, and so is its interval
    few = attack(_attack(0.05, 40))
    assert few["tpr_at_1pct_fpr_ci95_low"] == few["tpr_at_1pct_fpr"]
    assert few["tpr_at_1pct_fpr"].startswith(WITHHELD)
    check_shared(shared_audit(membership_inference=few), "audit.json")
    few |= {"tpr_at_1pct_fpr_ci95_low": 0.0061}  # the exact interval of 2 of 40 starts there
    with pytest.raises(FedsynthError, match=r"tpr_at_1pct_fpr_ci95_low is not the interval"):
        check_shared(shared_audit(membership_inference=few), "audit.json")


def test_a_shared_audit_with_a_figure_the_rule_withholds_is_refused():
    audit = shared_audit()
    tpr = shared_audit(membership_inference=attack(_attack(0.0, 40)))
    check_shared(tpr, "audit.json")  # no member flagged
    for figure, value in (("tpr_at_1pct_fpr", 0.05), ("tpr_at_1pct_fpr", 0.95)):
        tpr["membership_inference"] = audit["membership_inference"] | {figure: value}
        with pytest.raises(FedsynthError, match=f"{figure} is not a figure"):
            check_shared(tpr, "audit.json")  # 2 of 40 members flagged; 2 not
    overlapping = audit | {"dcr": audit["dcr"] | {"train_q05": 0.01, "train_q25": 0.02}}
    with pytest.raises(FedsynthError, match="train_q05 and another quantile differ by fewer"):
        check_shared(overlapping, "audit.json")  # windows 0-10 and 7-17 of 50 (median 19-29)
    with pytest.raises(FedsynthError, match="closer_to_training_share is not a figure"):
        check_shared(audit | {"dcr": audit["dcr"] | {"closer_to_training_share": 0.04}}, "a")


def test_a_folder_the_study_never_released_is_not_audited_as_its_release(tmp_path):
    """Patients' volumes copied into cohort/, the record written by anyone: the release's
    privacy.json must name the record's fingerprint."""
    (tmp_path / "cohort").mkdir()
    (tmp_path / "cohort" / "subject-0042.nii.gz").write_bytes(b"a patient's scan")
    fingerprint = write_cohort_hashes(tmp_path)
    with pytest.raises(FedsynthError, match=r"privacy.json is missing or not JSON"):
        check_cohort_hashes(tmp_path)
    statement = tmp_path / "privacy.json"
    statement.write_text(json.dumps({"cohort_sha256": fingerprint}))
    with pytest.raises(FedsynthError, match=r"names no study"):
        check_cohort_hashes(tmp_path)
    statement.write_text(json.dumps({"study_id": "s", "cohort_sha256": "1" * 64}))
    with pytest.raises(FedsynthError, match=r"does not name this cohort's fingerprint"):
        check_cohort_hashes(tmp_path)
    statement.write_text(json.dumps({"study_id": "s", "cohort_sha256": fingerprint}))
    assert check_cohort_hashes(tmp_path) == fingerprint


def test_cli_publishes_exact_counts_only_when_the_site_opts_in(site, cohorts, tmp_path, capsys):
    """The audit's options of the node config's names: rounded by default (24 -> 20),
    exact with --disclose-subject-count, a declared size at most the real count."""
    base = ["--release", str(cohorts["five"]), "--data-path", str(site["folders"]["nonmembers"])]
    base += ["--config", "tiny"]
    for extra, count, mode in (
        ([], 20, "rounded"),
        (["--disclose-subject-count"], NONMEMBERS, "exact"),
        (["--public-subjects", "22"], 22, "declared"),
    ):
        report = audit_json(capsys, *base, *extra, "--out", str(tmp_path / mode))
        assert (report["training_subjects"], report["subject_counts"]) == (count, mode)
        assert_shareable(report)
    out = ["--out", str(tmp_path / "refused")]
    assert "exceeds the 24 subjects" in refusal(capsys, *base, "--public-subjects", "25", *out)
    both = ["--public-subjects", "20", "--disclose-subject-count"]
    assert "give one" in refusal(capsys, *base, *both, *out)


# ------------------------- withholding reads the published sizes, never the exact count


def _mia(n_members: int, tpr: float = 0.0) -> dict:
    """An attack's exact figures over `n_members` members and 2000 non-members."""
    return _attack(tpr, n_members, 2000) | {"auc": 0.61, "auc_uncalibrated": 0.58}


def _withheld_fields(shared: dict) -> dict[str, bool]:
    return {k: isinstance(v, str) and v.startswith(WITHHELD) for k, v in shared.items()}


def test_attack_withholding_does_not_tell_the_count_within_its_public_size():
    """10 and 15 training subjects both publish 10 (`training_subjects: 10`): an AUC
    withheld for 10 and shown for 15 would tell n = 10 from 11..19. A TPR of 0.95 over
    members published as 220 leaves 11 unflagged of 220 but 10 of 221; 0.01 over a
    declared 40 is 5 of 500 but 50 of 5000; a declared 5 may be 5 or 15."""
    assert public_count(10) == public_count(15) == 10
    assert public_count(220) == public_count(221) == 220
    for (a, tpr_a), (b, tpr_b), members, mode in (
        ((10, 0.0), (15, 0.0), 10, "rounded"),
        ((220, 209 / 220), (221, 211 / 221), 220, "rounded"),
        ((500, 5 / 500), (5000, 50 / 5000), 40, "declared"),
        ((5, 0.0), (15, 0.0), 5, "declared"),
    ):
        assert rounded(tpr_a) == rounded(tpr_b)  # the same published figure
        low = attack(_mia(a, tpr_a), members, 2000, mode)
        high = attack(_mia(b, tpr_b), members, 2000, mode)
        assert _withheld_fields(low) == _withheld_fields(high), (a, b, mode)
    disclosed = attack(_mia(10), 10, 2000, "exact")
    assert disclosed["auc"] == f"{WITHHELD} {MIN_RECORDS} members or non-members"
    assert attack(_mia(11), 11, 2000, "exact")["auc"] == 0.61


def test_share_withholding_does_not_tell_the_count_within_its_public_size():
    """The share's set is published as its public size (10 for 10..19): the rule reads
    that, so 10 and 19 subjects per set give the same answer."""
    assert public_count(10) == public_count(19) == 10
    out = share(0.5, 200, public_count(10), 11)
    other = share(0.5, 200, public_count(19), 11)
    assert out == other == f"{WITHHELD} {MIN_RECORDS} subjects per set as published"


def test_dcr_withholding_does_not_tell_the_count_within_its_public_size():
    """15 training subjects published as 10: quantiles and nndr withheld as for 10 (whose
    windows cannot have 11 distinct subjects), and nndr withheld rather than null for a
    single training subject (null would tell n = 1 from the 1 to 9 that publish 1)."""
    m = 40
    for subjects in (10, 15):
        result = DcrResult(
            summary={"closer_to_training_share": None, "share_subsampled_to": None},
            nearest_subject=torch.arange(m) % subjects,
            to_train=torch.linspace(0.01, 0.4, m, dtype=torch.float64),
            to_holdout=None,
            nearest_holdout=None,
            nndr=torch.linspace(0.2, 0.9, m, dtype=torch.float64),
        )
        shared = result.shared(public_count(subjects), None)
        for key in ("train_median", "train_q05", "nndr_median", "nndr_q05"):
            assert shared[key] == f"{WITHHELD} {MIN_RECORDS} subjects in the set as published"
    single = dataclasses.replace(result, nearest_subject=torch.zeros(m, dtype=torch.long))
    shared = dataclasses.replace(single, nndr=None).shared(public_count(1), None)
    assert (
        shared["nndr_median"]
        == shared["nndr_q05"]
        == (f"{WITHHELD} {MIN_RECORDS} subjects in the set as published")
    )


def test_release_check_withholds_on_every_count_the_published_size_stands_for():
    """check_shared takes the same worst case: an AUC or a DCR quantile over a training
    set published as 10 (it may be 10 subjects) is refused, a TPR of 0.95 over members
    published as 220 (it may leave 10 of 220 unflagged) too, and an nndr of null (it
    would tell 1 training subject)."""
    gone = f"{WITHHELD} {MIN_RECORDS} subjects in the set as published"
    ten = shared_audit(training_subjects=10)
    ten["dcr"] = {"train_median": gone, "nndr_q05": gone, "nndr_median": gone}
    ten["dcr"]["share_subsampled_to"] = 10
    ten["membership_inference"] = attack(_attack(0.0, 10), 10, 12000)
    check_shared(ten, "audit.json")
    with pytest.raises(FedsynthError, match=r"membership_inference\.auc is not a figure"):
        check_shared(
            ten | {"membership_inference": ten["membership_inference"] | {"auc": 0.61}}, "a"
        )
    with pytest.raises(FedsynthError, match=r"dcr\.train_median is not a figure"):
        check_shared(ten | {"dcr": ten["dcr"] | {"train_median": 0.073}}, "audit.json")
    big = shared_audit(training_subjects=220)
    big["dcr"] = big["dcr"] | {"share_subsampled_to": 220}
    big["membership_inference"] = attack(_attack(0.0, 220), 220, 12000)
    check_shared(big, "audit.json")
    mia = big["membership_inference"] | {"tpr_at_1pct_fpr": 0.95}
    with pytest.raises(FedsynthError, match="tpr_at_1pct_fpr is not a figure"):
        check_shared(big | {"membership_inference": mia}, "audit.json")
    nndr = shared_audit(dcr=shared_audit()["dcr"] | {"nndr_median": None})
    with pytest.raises(FedsynthError, match="nndr_q05 / nndr_median is null"):
        check_shared(nndr, "audit.json")


def test_a_published_rate_stands_for_every_count_it_may_round_from():
    """small_count over a range of totals and the rates that round to the published one:
    0.99 of 2000..2099 members may leave 10 unflagged (0.995 x 2000 flagged), 1.0 of 50
    is all 50 (0.995 x 50 leaves under 1), 0.5 of 20 and up may be 10, 0.001 of 2000 and
    up may be 2 (of 20000 and up at least 19)."""
    assert small_count(0.99, 2000, 2099) and not small_count(1.0, 50)
    assert small_count(0.5, 20, math.inf) and not small_count(0.5, 30, math.inf)
    assert small_count(0.001, 2000, math.inf) and not small_count(0.001, 20000, math.inf)
    assert not small_count(0.0, 20, math.inf)  # no member flagged: no cell
    assert count_range(10, "rounded") == (10, 19) and count_range(1, "rounded") == (1, 9)
    assert count_range(1200, "rounded") == (1200, 1299) and count_range(5, "exact") == (5, 5)
    assert count_range(5, "declared") == (5, math.inf)
