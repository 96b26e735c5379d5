"""`fedsynth release` on a real finished study (tests/study_driver.py: the ServerApp loop and
ClientApp sites with SecAgg+ in one process): every file written, privacy.json equal to the
ledger recomputed independently, and every bad run dir refused in one line with nothing
written."""

from __future__ import annotations

import csv
import hashlib
import html
import json
import re
import shutil
from pathlib import Path

import pytest
from study_driver import drive

from fedsynth.common.audit_publication import PUBLISHED
from fedsynth.common.cli import main
from fedsynth.common.cohort_hashes import COHORT_HASHES
from fedsynth.common.config import load_config
from fedsynth.common.errors import FedsynthError
from fedsynth.common.ledger import charged, read_ledger, segment_of
from fedsynth.common.privacy_verify import verify_release
from fedsynth.server.finished_study import read_finished_study
from fedsynth.server.release import release

ROUNDS = 2
SITES = ("site-1", "site-2", "site-3")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_checkpoint, site_phantoms) -> Path:
    tmp = tmp_path_factory.mktemp("finished")
    done = drive(tmp, tiny_checkpoint, site_phantoms, ROUNDS, secure=True, resume=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return tmp / "run"


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    """A copy of the finished run dir a test may damage."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def _nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")]


def _opacus_epsilon(lines: list[dict], delta: float) -> float:
    """Epsilon straight from Opacus' RDP accountant, not through fedsynth's accountant."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in lines]
    return accountant.get_epsilon(delta)


def test_a_finished_study_is_released_with_a_statement_equal_to_its_ledger(
    finished_run, site_phantoms, tmp_path, capsys, one_thread
):
    out = tmp_path / "release"
    reference = site_phantoms / "site-1"
    assert (
        main(
            [
                "release",
                "--run",
                str(finished_run),
                "--n",
                "3",
                "--out",
                str(out),
                "--reference",
                str(reference),
                "--quiet",
            ]
        )
        == 0
    )
    assert "released 3 synthetic volumes" in capsys.readouterr().out
    with (out / "cohort" / "manifest.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and {r["synthetic"] for r in rows} == {"yes"}
    assert all((out / "cohort" / r["image"]).is_file() for r in rows)
    # the record a site's audit checks: every file of cohort/ with its SHA-256
    record = (out / COHORT_HASHES).read_text().splitlines()
    names = ["manifest.csv", *(r["image"] for r in rows)]
    assert sorted(line.split("  ")[1] for line in record) == sorted(f"cohort/{n}" for n in names)
    for line in record:
        digest, name = line.split("  ")
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest

    statement = json.loads((out / "privacy.json").read_text())
    # the release vouches for its cohort record: an audit checks this fingerprint
    fingerprint = hashlib.sha256((out / COHORT_HASHES).read_bytes()).hexdigest()
    assert statement["cohort_sha256"] == fingerprint and statement["study_id"]
    ledger = read_ledger(finished_run / "ledger.jsonl")
    assert (out / "ledger.jsonl").read_bytes() == (finished_run / "ledger.jsonl").read_bytes()
    summary = json.loads((finished_run / "summary.json").read_text())
    assert set(statement["sites"]) == set(SITES)
    for site, entry in statement["sites"].items():
        lines = charged(ledger, site)
        assert lines and entry["rounds"] == list(range(1, ROUNDS + 1))
        assert entry["epsilon"] == pytest.approx(_opacus_epsilon(lines, statement["delta"]))
        assert entry["epsilon"] == pytest.approx(summary["site_epsilon"][site], rel=1e-12)
        assert entry["noise_multipliers"] == [e["noise_multiplier"] for e in lines]
        assert entry["sample_rates"] == [e["sample_rate"] for e in lines]
        assert entry["steps"] == [e["steps"] for e in lines]
    assert statement["study_epsilon"] == max(e["epsilon"] for e in statement["sites"].values())
    assert statement["accountant"] == "rdp" and statement["accountant_library"].startswith("opacus")
    clip = load_config("tiny").privacy.max_grad_norm  # the study's, as its run dir says
    assert statement["clip"] == clip and statement["privacy_unit"].startswith("subject")
    secagg = statement["secure_aggregation"]
    assert secagg["enabled"] and set(secagg["rounds"]) == {"1", "2"}
    assert all(
        r["reconstruction_threshold"] >= 2 and r["sites"] == 3 for r in secagg["rounds"].values()
    )
    assert any("public pretraining" in t for t in statement["not_covered"])
    assert verify_release(out) == pytest.approx(summary["site_epsilon"])

    report = html.unescape((out / "report.html").read_text())
    assert report.count("data:image/png;base64,") >= 3  # montage, epsilon plot, scatter
    assert not re.search(r"(src|href)=\"(https?:)?//", report) and "<link" not in report
    assert "Not covered by the guarantee" in report
    evaluation = json.loads((out / "evaluation.json").read_text())  # --reference measured it
    assert evaluation["synthetic"] == {**evaluation["synthetic"], "volumes": 3, "path": "cohort"}
    assert evaluation["real"]["path"] == "site-1"  # published: no coordinator paths
    halves = evaluation["fidelity"]["3d"]["real_halves"]  # the yardstick: 3 vs 3 subjects
    assert (halves["n_real"], halves["n_synthetic"]) == (6, 6)
    assert evaluation["real"]["volumes"] == 12
    assert "Frechet distance, volumes" in report and "MS-SSIM between pairs" in report
    # the guarantee leads: who is protected, what epsilon means, what is not covered
    first = report[: report.index("<h2>Quality</h2>")]
    assert "Who is protected" in first and "Not covered by the guarantee" in first
    assert "become at most" in first and "malicious coordinator" in first
    assert "data never left" not in report
    # nothing names the coordinator's folders: the run dir is not beside the release, so
    # the record and the reproduce line name it by a stand-in
    sampling = json.loads((out / "sampling.json").read_text())
    assert sampling["checkpoint"] == f"CHECKPOINTS/round-{ROUNDS:03d}"
    for text in (report, json.dumps(sampling)):
        assert str(tmp_path) not in text and str(finished_run.parent) not in text
    command = next(line for line in report.splitlines() if "fedsynth release --run" in line)
    assert "--run RUNS/run --n 3" in command and "--reference DATA/site-1" in command


def test_privacy_verify_catches_a_statement_that_differs_from_its_ledger(
    finished_run, tmp_path, capsys, one_thread
):
    out = tmp_path / "release"
    release(finished_run, 2, out, show_progress=False)
    assert main(["privacy", "verify", "--release", str(out)]) == 0
    statement = json.loads((out / "privacy.json").read_text())
    statement["sites"]["site-2"]["epsilon"] *= 0.9  # a statement that understates
    (out / "privacy.json").write_text(json.dumps(statement))
    capsys.readouterr()
    assert main(["privacy", "verify", "--release", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "site-2 epsilon recomputes to" in err


def _rewrite_ledger(run: Path, change) -> None:
    lines = (run / "ledger.jsonl").read_text().splitlines()
    (run / "ledger.jsonl").write_text("\n".join(change(lines)) + "\n")


def _bump_steps(lines: list[str]) -> list[str]:
    entry = json.loads(lines[0])
    entry["steps"] += 1
    return [json.dumps(entry), *lines[1:]]


def _over_target(run: Path) -> None:
    """A consistent run dir (summary agrees with the ledger) whose site-1 is over target."""
    from fedsynth.common.accountant import Segment, epsilon

    entry = json.loads((run / "ledger.jsonl").read_text().splitlines()[0])
    entry.update(round=ROUNDS, steps=500, sample_rate=1.0, noise_multiplier=0.8)
    lines = [*charged(read_ledger(run / "ledger.jsonl"), "site-1"), entry]
    segments = [Segment(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in lines]
    entry["epsilon"] = epsilon(segments, entry["delta"], "rdp")  # the line is consistent
    with (run / "ledger.jsonl").open("a") as f:
        f.write(json.dumps(entry) + "\n")
    summary = json.loads((run / "summary.json").read_text())
    summary["site_epsilon"]["site-1"] = entry["epsilon"]
    assert summary["site_epsilon"]["site-1"] > summary["target_epsilon"]  # the case is hit
    (run / "summary.json").write_text(json.dumps(summary))


def _swap_unet(run: Path) -> None:
    rounds = run / "rounds"
    shutil.copyfile(rounds / "round-001" / "unet.pt", rounds / f"round-{ROUNDS:03d}" / "unet.pt")


def _summary(change):
    def apply(run: Path) -> None:
        summary = json.loads((run / "summary.json").read_text())
        change(summary)
        (run / "summary.json").write_text(json.dumps(summary))

    return apply


BAD_RUNS = {
    "ledger missing": (lambda run: (run / "ledger.jsonl").unlink(), "ledger.jsonl is missing"),
    "ledger line not JSON": (
        lambda run: _rewrite_ledger(run, lambda ls: [ls[0], "{not json", *ls[1:]]),
        "line 2: not a JSON ledger entry",
    ),
    "ledger torn": (
        lambda run: (run / "ledger.jsonl").open("a").write('{"round": 2, "si'),
        "torn line",
    ),
    "ledger edited": (
        lambda run: _rewrite_ledger(run, _bump_steps),
        r"line 1: says site-\d is at epsilon [\d.]+, the lines up to it give",
    ),
    "summary understates": (
        _summary(lambda s: s["site_epsilon"].update({"site-3": s["site_epsilon"]["site-3"] / 2})),
        r"site-3 epsilon [\d.]+, but its ledger gives",
    ),
    "a site over target": (_over_target, r"site-1 epsilon [\d.]+ exceeds the study's target 10"),
    "checkpoint swapped": (_swap_unet, "unet.pt: SHA-256 differs"),
    "no checkpoint hash": (
        _summary(lambda s: s.pop("checkpoint_sha256")),
        "do not agree on the checkpoint's SHA-256",
    ),
    "terms changed": (
        lambda run: (run / "terms.json").write_text('{"delta": 0.001, "accountant": "rdp"}'),
        "terms.json fixes delta 0.001",
    ),
    "target in terms changed": (
        lambda run: (run / "terms.json").write_text(
            json.dumps({**json.loads((run / "terms.json").read_text()), "target_epsilon": 5.0})
        ),
        "terms.json fixes target_epsilon 5.0, the checkpoint's config says 10.0",
    ),
    "summary damaged": (
        lambda run: (run / "summary.json").write_text("{"),
        "summary.json is damaged",
    ),
}


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_a_run_dir_that_does_not_hold_up_is_refused_with_nothing_written(
    run_copy, tmp_path, case, capsys
):
    damage, message = BAD_RUNS[case]
    damage(run_copy)
    out = tmp_path / "release"
    assert main(["release", "--run", str(run_copy), "--n", "2", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fedsynth release: error:")
    assert re.search(message, err), err
    _nothing_written(out)


@pytest.mark.parametrize("kill", ["server-ledger:4", "checkpoint:1", "checkpoint:2"])
def test_a_study_killed_mid_round_is_refused(tiny_checkpoint, site_phantoms, tmp_path, kill):
    """server-ledger:4: round 2's first line is on disk, its checkpoint is not; checkpoint:R:
    round R saved, its summary not written (none at all after round 1). Each says to
    resume, and nothing is written."""
    killed = drive(tmp_path, tiny_checkpoint, site_phantoms, ROUNDS, True, False, kill)
    assert killed.returncode != 0
    out = tmp_path / "release"
    with pytest.raises(FedsynthError, match="stopped mid-round; resume it"):
        release(tmp_path / "run", 2, out, show_progress=False)
    _nothing_written(out)


def test_bad_arguments_are_refused_before_anything_is_written(finished_run, tmp_path, one_thread):
    out = tmp_path / "release"
    bad_audit = tmp_path / "audit.json"
    bad_audit.write_text('{"dcr": 1}')
    with pytest.raises(FedsynthError, match="not the output of fedsynth audit"):
        release(finished_run, 2, out, audit_files=[bad_audit], show_progress=False)
    _nothing_written(out)
    # a site's private, exact figures (5 volumes: the median is one patient's distance)
    exact = {
        "outside_dp_guarantee": True,
        "published": PUBLISHED,
        "cohort_sha256": "0" * 64,
        "cohort_volumes": 5,
        "training_subjects": 20,
        "holdout_subjects": None,
        "subject_counts": "rounded",
        "dcr": {"train_median": 0.0731946, "train_q05": "withheld: fewer than 11 volumes"},
        "membership_inference": None,
    }
    for audit, message in (
        (exact, r"dcr.train_median is not a figure the site may share"),
        (exact | {"dcr": {"train_median": 0.073}}, r"dcr.train_median is not a figure"),
        (exact | {"cohort_volumes": 50, "cohort_sha256": None}, "names no audited cohort"),
        (exact | {"training_subjects": 24}, "training_subjects is not a public size"),
        (exact | {"site_count": 24}, "site_count is not a field of a shared audit"),
    ):
        bad_audit.write_text(json.dumps(audit))
        with pytest.raises(FedsynthError, match=message):
            release(finished_run, 2, out, audit_files=[bad_audit], show_progress=False)
        _nothing_written(out)
    with pytest.raises(FedsynthError, match="no manifest"):
        release(finished_run, 2, out, reference=tmp_path, show_progress=False)
    _nothing_written(out)
    with pytest.raises(FedsynthError, match="--n must be at least 1"):
        release(finished_run, 0, out, show_progress=False)
    _nothing_written(out)
    out.mkdir()
    (out / "keep.txt").write_text("a file of the user's")
    with pytest.raises(FedsynthError, match="not an empty folder"):
        release(finished_run, 2, out, show_progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_sites_audit_is_reported_outside_the_guarantee(
    finished_run, site_phantoms, tiny_checkpoint, tmp_path, capsys, one_thread
):
    """site-1 audits a released cohort on its own data (site-2's subjects stand in for its
    held-out ones) and shares the JSON; the next release (the same command: the same
    cohort) reports it, labelled and marked, with only the figures the rule lets through."""
    first = tmp_path / "first"
    release(finished_run, 2, first, show_progress=False)
    capsys.readouterr()
    assert (
        main(
            [
                "audit",
                "--release",
                str(first),
                "--data-path",
                str(site_phantoms / "site-1"),
                "--holdout",
                str(site_phantoms / "site-2"),
                "--checkpoint",
                str(finished_run / "rounds" / f"round-{ROUNDS:03d}"),
                "--reference",
                str(tiny_checkpoint),
                "--out",
                str(tmp_path / "audit"),
                "--json",
                "--quiet",
            ]
        )
        == 0
    )
    shared = tmp_path / "site-1-audit.json"
    shared.write_text(capsys.readouterr().out)
    out = tmp_path / "release"
    release(finished_run, 2, out, audit_files=[f"site-1={shared}"], show_progress=False)
    [audit] = json.loads((out / "audits.json").read_text())
    assert audit["label"] == "site-1" and audit["outside_dp_guarantee"] is True
    # 6 training subjects, published as the public size 1 (the default rounding)
    assert audit["membership_inference"]["n_members"] == audit["training_subjects"] == 1
    assert audit["subject_counts"] == "rounded"
    fingerprint = hashlib.sha256((out / COHORT_HASHES).read_bytes()).hexdigest()
    assert audit["cohort_sha256"] == fingerprint
    report = html.unescape((out / "report.html").read_text())
    section = report[report.index("<h2>Memorisation audits</h2>") :]
    assert "outside the DP guarantee" in section and "<h3>site-1</h3>" in section
    assert fingerprint in section and "audited this release's cohort" in section
    # 2 volumes, 6 members: every figure rests on fewer than 11 records
    assert audit["membership_inference"]["auc"] == "withheld: fewer than 11 members or non-members"
    assert audit["dcr"]["train_median"] == "withheld: fewer than 11 synthetic volumes"
    assert "withheld: fewer than 11 members or non-members" in section
    exact = json.loads((tmp_path / "audit" / "audit.json").read_text())
    for value in (exact["dcr"]["train_median"], exact["membership_inference"]["auc"]):
        if value in (0.0, 0.5, 1.0):  # an AUC of 1 member against 1: the legend's own numbers
            continue
        assert f"{value:.4g}" not in section and f"{value:.2g}" not in json.dumps(audit)


def _first_training_volume(site: Path) -> Path:
    with (site / "manifest.csv").open(newline="") as f:
        return site / next(csv.DictReader(f))["image"]


def _slip_in(cohort: Path, volume: Path) -> None:
    shutil.copyfile(volume, cohort / "syn-0002.nii.gz")


def _swap(cohort: Path, volume: Path) -> None:
    shutil.copyfile(volume, cohort / "syn-0001.nii.gz")


def _tamper(cohort: Path, volume: Path) -> None:
    data = bytearray((cohort / "syn-0001.nii.gz").read_bytes())
    data[-9] ^= 1
    (cohort / "syn-0001.nii.gz").write_bytes(bytes(data))


COHORT_CHANGES = {
    "a training volume slipped in": (_slip_in, "syn-0002.nii.gz is not in the release's"),
    "a volume swapped for a patient's": (_swap, "syn-0001.nii.gz differs from its SHA-256"),
    "a tampered volume": (_tamper, "syn-0001.nii.gz differs from its SHA-256"),
    "a volume missing": (
        lambda cohort, _: (cohort / "syn-0001.nii.gz").unlink(),
        "syn-0001.nii.gz is listed in cohort.sha256 but missing",
    ),
    "no record of hashes": (
        lambda cohort, _: (cohort.parent / COHORT_HASHES).unlink(),
        "cohort.sha256 is missing or unreadable",
    ),
}


@pytest.mark.parametrize("case", list(COHORT_CHANGES))
def test_the_audit_takes_only_the_releases_own_cohort(
    a_release, site_phantoms, tmp_path, capsys, case
):
    """A coordinator passing patients' volumes off as the cohort: refused in one line
    naming the file, before any volume is read."""
    copy = Path(shutil.copytree(a_release, tmp_path / "release"))
    change, message = COHORT_CHANGES[case]
    change(copy / "cohort", _first_training_volume(site_phantoms / "site-1"))
    args = ["audit", "--release", str(copy), "--data-path", str(site_phantoms / "site-1")]
    args += ["--config", "tiny", "--out", str(tmp_path / "audit"), "--quiet"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "audit").exists()


# -- found by review: consistent edits, malformed values, verify, a plain study ---------------


def _lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "ledger.jsonl").read_text().splitlines()]


def _write(run: Path, lines: list[dict]) -> None:
    (run / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))


def _summary_agrees(run: Path) -> None:
    """What a careless (or motivated) editor does: summary.json recomputed from the ledger."""
    from fedsynth.common.config import load_config
    from fedsynth.server.privacy_ledger import site_epsilons

    summary = json.loads((run / "summary.json").read_text())
    summary["site_epsilon"] = site_epsilons(_lines(run), load_config("tiny"))
    (run / "summary.json").write_text(json.dumps(summary))


def _drop_round_1(lines: list[dict]) -> list[dict]:
    return [e for e in lines if e["round"] != 1]


def _huge_sigma_round_2(lines: list[dict]) -> list[dict]:
    return [{**e, "noise_multiplier": 1e6} if e["round"] == 2 else e for e in lines]


def _refused_replaces_trained(lines: list[dict]) -> list[dict]:
    trained = {**lines[3], "estimate": "2-abc"}  # a trained line given an estimate id
    fake = {**trained, "status": "refused", "steps": 0, "replaces_estimate": "2-abc"}
    del fake["estimate"]
    return [*lines[:3], trained, *lines[4:], fake]


@pytest.mark.parametrize(
    "edit,message",
    [
        (_drop_round_1, "line 1: says site-. is at epsilon"),
        (_huge_sigma_round_2, "line 4: says site-. is at epsilon"),
        (_refused_replaces_trained, "replaces estimate '2-abc', which is not"),
    ],
    ids=["round deleted", "sigma raised", "fake replacement"],
)
def test_a_ledger_edited_consistently_with_its_summary_is_refused(run_copy, edit, message):
    """Each edit lowered the stated epsilon (to about 6.9 of 9.95) while summary.json was
    made to agree; each line's own epsilon, recomputed, shows the ledger was changed."""
    _write(run_copy, edit(_lines(run_copy)))
    _summary_agrees(run_copy)
    lowered = json.loads((run_copy / "summary.json").read_text())["site_epsilon"]
    assert min(lowered.values()) < 9.0  # the edit really lowers what would be stated
    with pytest.raises(FedsynthError, match=message):
        read_finished_study(run_copy)


@pytest.mark.parametrize(
    "key,value", [("steps", "two"), ("steps", 2.9), ("round", None), ("site", 7), ("site", ["x"])]
)
def test_a_malformed_ledger_value_is_refused_in_one_line(run_copy, tmp_path, capsys, key, value):
    lines = _lines(run_copy)
    lines[0][key] = value
    _write(run_copy, lines)
    out = tmp_path / "release"
    assert main(["release", "--run", str(run_copy), "--n", "1", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"ledger.jsonl, line 1: {key}" in err, err
    _nothing_written(out)


@pytest.mark.parametrize(
    "where,key,value",
    [
        ("state.json", "rounds_done", None),
        ("summary.json", "rounds_done", "two"),
        ("summary.json", "site_epsilon", None),
        ("summary.json", "secure_aggregation", False),
    ],
)
def test_a_malformed_run_record_is_refused_in_one_line(
    run_copy, capsys, tmp_path, where, key, value
):
    record = json.loads((run_copy / where).read_text())
    record[key] = value
    (run_copy / where).write_text(json.dumps(record))
    out = tmp_path / "release"
    assert main(["release", "--run", str(run_copy), "--n", "1", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and where in err, err
    _nothing_written(out)


@pytest.fixture(scope="module")
def a_release(finished_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("a-release") / "release"
    release(finished_run, 1, out, show_progress=False)
    return out


def _tampered(a_release: Path, tmp_path: Path, change) -> Path:
    copy = Path(shutil.copytree(a_release, tmp_path / "release"))
    statement = json.loads((copy / "privacy.json").read_text())
    change(copy, statement)
    (copy / "privacy.json").write_text(json.dumps(statement))
    return copy


def _torn(copy: Path, statement: dict) -> None:
    """The last line torn off, and the statement made to agree with what is left."""
    data = (copy / "ledger.jsonl").read_bytes()
    (copy / "ledger.jsonl").write_bytes(data.rstrip(b"\n"))


def _understated(copy: Path, statement: dict) -> None:
    """site-1's noise doubled on every line, and every epsilon in the ledger and the
    statement recomputed to agree: consistent, but not what site-1 signed."""
    from fedsynth.common.accountant import epsilon

    delta, accountant = statement["delta"], statement["accountant"]
    lines = [json.loads(line) for line in (copy / "ledger.jsonl").read_text().splitlines()]
    for e in lines:
        if e["site"] == "site-1":
            e["noise_multiplier"] *= 2
    for i, e in enumerate(lines):
        history = [segment_of(x) for x in charged(lines[: i + 1], e["site"])]
        e["epsilon"] = epsilon(history, delta, accountant)
    (copy / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    counted = charged(lines, "site-1")
    entry = statement["sites"]["site-1"]
    entry["noise_multipliers"] = [e["noise_multiplier"] for e in counted]
    entry["epsilon"] = epsilon([segment_of(e) for e in counted], delta, accountant)
    largest = max(site["epsilon"] for site in statement["sites"].values())
    statement["study_epsilon"] = largest
    statement["guarantee"] = f"({largest:.4g}, {delta:g})-differential privacy per subject"


TAMPERED = {
    "torn ledger": (_torn, "ends in a torn or unterminated line"),
    "spend rewritten without the site's key": (
        _understated,
        "site-1's spend is not signed by site-1's key",
    ),
    "guarantee text": (
        lambda _, s: s.update(guarantee="(1, 1e-05)-differential privacy per subject"),
        "guarantee's text does not state",
    ),
    "noise listed": (
        lambda _, s: s["sites"]["site-1"].update(noise_multipliers=[50.0, 50.0]),
        "site-1 noise_multipliers differ",
    ),
    "site delta": (lambda _, s: s["sites"]["site-2"].update(delta=0.5), "site-2 delta differ"),
    "no site": (lambda _, s: s.update(sites={}), "states no site"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_verify_checks_the_whole_statement_against_the_ledger(a_release, tmp_path, case):
    assert verify_release(a_release)  # the untouched release verifies
    change, message = TAMPERED[case]
    with pytest.raises(FedsynthError, match=message):
        verify_release(_tampered(a_release, tmp_path, change))


def test_a_plain_study_is_not_described_as_securely_aggregated(
    tiny_checkpoint, site_phantoms, tmp_path, one_thread
):
    done = drive(tmp_path, tiny_checkpoint, site_phantoms, 1, secure=False, resume=False)
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "release"
    statement = release(tmp_path / "run", 1, out, show_progress=False)
    assert statement["secure_aggregation"] == {
        "enabled": False,
        "rounds": {},
        "plain_rounds": [1],
        "min_sites": 2,
    }
    assert "SecAgg+" not in statement["trust_model"] and "was off" in statement["trust_model"]
    assert "securely aggregated" not in html.unescape((out / "report.html").read_text())


def test_a_study_whose_rounds_differ_states_secure_aggregation_round_by_round(
    run_copy, tmp_path, one_thread
):
    """A study run plain, then resumed under SecAgg+ (before the terms fixed secure
    aggregation, as such a run dir was left): round 1's checkpoint records no SecAgg+ and
    its config says plain, round 2 ran under it. The statement claims SecAgg+ for round 2
    only and says round 1 ran plain."""
    (run_copy / "terms.json").write_text(
        json.dumps(
            {
                k: v
                for k, v in json.loads((run_copy / "terms.json").read_text()).items()
                if k in ("delta", "accountant", "study_id")
            }
        )
    )
    folder = run_copy / "rounds" / "round-001"
    metadata = json.loads((folder / "metadata.json").read_text())
    metadata["secagg"] = None
    (folder / "metadata.json").write_text(json.dumps(metadata))
    config = (folder / "config.yaml").read_text()
    assert "secure-aggregation: true" in config
    (folder / "config.yaml").write_text(
        config.replace("secure-aggregation: true", "secure-aggregation: false")
    )
    out = tmp_path / "release"
    statement = release(run_copy, 1, out, show_progress=False)
    secagg = statement["secure_aggregation"]
    assert secagg["enabled"] is False and secagg["plain_rounds"] == [1]
    assert set(secagg["rounds"]) == {"2"} and secagg["rounds"]["2"]["sites"] == 3
    trust = statement["trust_model"]
    assert "SecAgg+) kept each site's update from the coordinator in round 2, " in trust
    assert "Secure aggregation was off in round 1: the coordinator saw" in trust
    assert "except in round(s) 1, where it was off" in html.unescape(
        (out / "report.html").read_text()
    )
    assert verify_release(out)


def test_a_study_with_an_unreplaced_estimate_is_released_counting_it(
    run_copy, tiny_checkpoint, tmp_path, one_thread
):
    """site-3's reply in the last round never came (its line taken out, and the round
    charged for it as the server does, charge_estimate, with the round saved with one site
    fewer): the estimate lands on the target, not above, so the study is released and its
    statement counts the estimate and says what it means."""
    import yaml

    from fedsynth.common.config import config_from_dict
    from fedsynth.server.privacy_ledger import ESTIMATE_TOLERANCE, charge_estimate
    from fedsynth.server.study import Study

    lines = _lines(run_copy)
    [lost] = [e for e in lines if e["site"] == "site-3" and e["round"] == ROUNDS]
    _write(run_copy, [e for e in lines if e is not lost])
    folder = run_copy / "rounds" / f"round-{ROUNDS:03d}"
    config = config_from_dict(yaml.safe_load((folder / "config.yaml").read_text()))
    charge_estimate(
        Study(config, run_copy, None, tiny_checkpoint, True), ROUNDS, "site-3", identity="node:3"
    )
    metadata = json.loads((folder / "metadata.json").read_text())
    metadata["sites_trained"] -= 1
    (folder / "metadata.json").write_text(json.dumps(metadata))
    _summary_agrees(run_copy)
    out = tmp_path / "release"
    statement = release(run_copy, 1, out, show_progress=False)
    target = statement["target_epsilon"]
    site = statement["sites"]["site-3"]
    assert site["no_reply_estimates"] == 1
    assert target <= site["epsilon"] <= target * (1 + ESTIMATE_TOLERANCE)
    assert statement["study_epsilon"] == site["epsilon"]
    estimates = statement["no_reply_estimates"]
    assert estimates["count"] == 1 and estimates["sites"] == ["site-3"]
    assert "never came" in estimates["meaning"] and "at most that" in estimates["meaning"]
    assert "No-reply estimates:</b> 1 (site-3)" in html.unescape((out / "report.html").read_text())
    assert verify_release(out)["site-3"] == pytest.approx(site["epsilon"], rel=1e-12)


def test_the_reports_plain_words_follow_the_posterior_bound():
    from fedsynth.server.release_report import plain_words

    # e^10 * 0.01 / (0.99 + e^10 * 0.01) = 0.99552
    assert "become at most 99.6% sure" in plain_words(10.0)
    assert "become at most 2.7% sure" in plain_words(1.0) and "strong bound" in plain_words(1.0)
