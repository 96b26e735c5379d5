"""Phantom subjects written as the public cardiac MRI datasets distribute them.

Each writer builds a source tree in one layout (ACDC, M&Ms, UK Biobank-style, a dcm2niix
cine listed in a CSV) from simulations/phantoms.py subjects and returns the truth it
knows: the frame indices of ED and ES, the short-axis volumes, the clinical values.
A cine holds ED and ES at the layout's frame indices with filler frames between (blends
of the two; their segmentations, where a layout segments every frame, hold more LV
blood pool than ES). Label maps are renumbered to the dataset's convention and volumes
stored with the dataset's axis order, in an oblique affine: the importer must not depend
on the array order, only on the geometry (orientation.to_short_axis gives the phantom's
volume back).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff
from scipy import ndimage

from fedsynth.common.orientation import short_axis_affine
from fedsynth.simulations.phantoms import Subject, make_subject, site_profiles, subject_rng

FRAMES = 6
# the phantoms' labels 1 RV, 2 myocardium, 3 LV (4, 5 other tissue) -> each dataset's
ACDC_LABELS = {1: 1, 2: 2, 3: 3}
MNMS_LABELS = UKBB_LABELS = {1: 3, 2: 2, 3: 1}
# stored axis order: (target axis, flip) per short-axis array axis (nibabel orientation)
SWAPPED_ROWS = np.array([[1, -1], [0, 1], [2, 1]])  # ITK/LPS-like storage (ACDC, M&Ms)
SWAPPED = np.array([[1, 1], [0, 1], [2, 1]])  # UK Biobank-like
APEX_FIRST = np.array([[0, 1], [1, -1], [2, -1]])  # dcm2niix-like: rows flipped, apex first


@dataclass
class Truth:
    """What an import of one subject must give."""

    subject: str
    phantom: Subject
    ed: int  # frame index, 0-based
    es: int
    height: float  # cm
    weight: float  # kg
    age: int
    sex: int  # 0 female, 1 male

    @property
    def bmi(self) -> float:
        return self.weight / (self.height / 100) ** 2

    def image(self, phase: int) -> np.ndarray:
        return self.phantom.images[phase]

    def label(self, phase: int) -> np.ndarray:
        """The phase's label map in fedsynth's convention (heart only)."""
        label = self.phantom.labels[phase]
        return np.where(label <= 3, label, 0).astype(np.uint8)


def phantoms(count: int, seed: int, names: list[str], es_frames: list[int]) -> list[Truth]:
    """`count` phantom subjects of site-1 with ids `names`, ED at frame 0, ES at `es_frames`."""
    profile = site_profiles(1, seed)[0]
    truths = []
    for i in range(count):
        subject = make_subject(profile, subject_rng(seed, 9, i))
        height = 160.0 + 5 * i
        weight = round(subject.attributes["bmi"] * (height / 100) ** 2, 1)
        age, sex = int(subject.attributes["age"]), int(subject.attributes["sex"])
        truths.append(Truth(names[i], subject, 0, es_frames[i], height, weight, age, sex))
    return truths


def stored(array: np.ndarray, truth: Truth, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A short-axis array (3D, or 4D with frames last) and its affine in storage order."""
    affine = short_axis_affine(truth.phantom.spacing, array.shape[:3], truth.phantom.long_axis)
    moved = apply_orientation(array, order)
    return moved, affine @ inv_ornt_aff(order, array.shape[:3])


def relabel(label: np.ndarray, values: dict[int, int]) -> np.ndarray:
    lut = np.zeros(256, np.uint8)
    for ours, theirs in values.items():
        lut[ours] = theirs
    return lut[label]


def cine(truth: Truth) -> np.ndarray:
    """A 4D cine (rows, columns, slices, FRAMES): ED at truth.ed, ES at truth.es, blends between."""
    ed, es = truth.image(0), truth.image(1)
    frames = []
    for t in range(FRAMES):
        w = min(abs(t - truth.ed) / max(abs(truth.es - truth.ed), 1), 1.0)
        frames.append((1 - w) * ed + w * es)
    return np.stack(frames, axis=-1).astype(np.float32)


def segmentation(truth: Truth, every_frame: bool) -> np.ndarray:
    """4D labels in fedsynth's convention: ED and ES; with `every_frame`, ED's labels in
    the filler frames except beside ES, where ES's LV grows into its myocardium by a pixel
    (less LV than ED, more than ES); without, filler frames are unlabelled (M&Ms)."""
    ed, es = truth.label(0), truth.label(1)
    near_es = es.copy()
    grown = ndimage.binary_dilation(es == 3, np.ones((3, 3, 1), bool)) & (es == 2)
    near_es[grown] = 3
    frames = []
    for t in range(FRAMES):
        if t == truth.ed:
            frames.append(ed)
        elif t == truth.es:
            frames.append(es)
        elif not every_frame:
            frames.append(np.zeros_like(ed))
        else:
            frames.append(near_es if abs(t - truth.es) == 1 else ed)
    return np.stack(frames, axis=-1)


def save(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, path)


def write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def records(path: Path, truths: list[Truth], sex_as: str = "MF", body: bool = False) -> Path:
    """A --records CSV with age and sex (M/F or 1/0) of each subject; with `body` also
    height (cm) and weight (kg)."""
    rows = []
    for t in truths:
        row = {
            "subject": t.subject,
            "age": t.age,
            "sex": "MF"[1 - t.sex] if sex_as == "MF" else t.sex,
        }
        rows.append({**row, "height": t.height, "weight": t.weight} if body else row)
    return write_csv(path, rows)


def write_acdc(root: Path, count: int = 3, seed: int = 0) -> list[Truth]:
    """training/patientNNN/ with Info.cfg (1-based ED/ES), 3D frames, _gt and _4d files."""
    names = [f"patient{i:03d}" for i in range(1, count + 1)]
    truths = phantoms(count, seed, names, [3 + i % 2 for i in range(count)])
    for truth in truths:
        folder = root / "training" / truth.subject
        folder.mkdir(parents=True)
        (folder / "Info.cfg").write_text(
            f"ED: {truth.ed + 1}\nES: {truth.es + 1}\nGroup: NOR\nHeight: {truth.height:.1f}\n"
            f"NbFrame: {FRAMES}\nWeight: {truth.weight:.1f}\n"
        )
        for t in (truth.ed, truth.es):
            phase = 0 if t == truth.ed else 1
            stem = folder / f"{truth.subject}_frame{t + 1:02d}"
            save(stem.with_suffix(".nii.gz"), *stored(truth.image(phase), truth, SWAPPED_ROWS))
            label = relabel(truth.label(phase), ACDC_LABELS)
            save(Path(f"{stem}_gt.nii.gz"), *stored(label, truth, SWAPPED_ROWS))
        save(folder / f"{truth.subject}_4d.nii.gz", *stored(cine(truth), truth, SWAPPED_ROWS))
    return truths


MNMS_CODES = ["A0S9V9", "A1D0Q7", "B2F4K5", "C3H8N1"]


def write_mnms(root: Path, count: int = 3, seed: int = 1) -> list[Truth]:
    """The information CSV (0-based ED/ES, Sex M/F) and Training/Labeled/CODE/ 4D files."""
    truths = phantoms(count, seed, MNMS_CODES[:count], [2 + i for i in range(count)])
    rows = []
    for i, truth in enumerate(truths):
        folder = root / "Training" / "Labeled" / truth.subject
        save(folder / f"{truth.subject}_sa.nii.gz", *stored(cine(truth), truth, SWAPPED_ROWS))
        label = relabel(segmentation(truth, every_frame=False), MNMS_LABELS)
        save(folder / f"{truth.subject}_sa_gt.nii.gz", *stored(label, truth, SWAPPED_ROWS))
        rows.append(
            {
                "External code": truth.subject,
                "VendorName": "Siemens",
                "Vendor": "A",
                "Centre": 1 + i % 2,
                "ED": truth.ed,
                "ES": truth.es,
                "Age": truth.age,
                "Pathology": "NOR",
                "Sex": "MF"[1 - truth.sex],
                "Height": truth.height,
                "Weight": truth.weight,
            }
        )
    write_csv(root / "211230_M&Ms_Dataset_information_diagnosis_opendataset.csv", rows)
    return truths


def write_ukbb(root: Path, count: int = 3, seed: int = 2) -> list[Truth]:
    """One folder per eid with sa.nii.gz and seg_sa.nii.gz (every frame segmented)."""
    names = [str(1000001 + i) for i in range(count)]
    truths = phantoms(count, seed, names, [4 - i % 3 for i in range(count)])
    for truth in truths:
        folder = root / truth.subject
        save(folder / "sa.nii.gz", *stored(cine(truth), truth, SWAPPED))
        label = relabel(segmentation(truth, every_frame=True), UKBB_LABELS).astype(np.int16)
        save(folder / "seg_sa.nii.gz", *stored(label, truth, SWAPPED))
    return truths


def write_cine(root: Path, count: int = 3, seed: int = 3) -> list[Truth]:
    """dcm2niix-style 4D files (apex first) listed in cine.csv with 1-based ED/ES frame
    numbers, M&Ms-style labels (1 LV, 2 myocardium, 3 RV: --label-values 1,2,3) and
    age, sex, height and weight columns."""
    names = [f"Pat-{i}" for i in range(count)]
    truths = phantoms(count, seed, names, [5 - i for i in range(count)])
    rows = []
    for truth in truths:
        image = f"nifti/{truth.subject}/SAX_cine_{truth.subject}_20.nii.gz"
        label = f"nifti/{truth.subject}/SAX_cine_seg.nii.gz"
        save(root / image, *stored(cine(truth), truth, APEX_FIRST))
        seg = relabel(segmentation(truth, every_frame=False), MNMS_LABELS)
        save(root / label, *stored(seg, truth, APEX_FIRST))
        rows.append(
            {
                "subject": truth.subject,
                "file": image,
                "ed_frame1": truth.ed + 1,
                "es_frame1": truth.es + 1,
                "label": label,
                "age": truth.age,
                "sex": truth.sex,
                "height": truth.height,
                "weight": truth.weight,
            }
        )
    write_csv(root / "cine.csv", rows)
    return truths
