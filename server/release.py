"""`fedsynth release`: a synthetic cohort from a finished study, with its privacy statement.

Everything is checked before anything is written (server/finished_study.py: ledger,
summary, terms, checkpoint hash, a whole last round; the output folder new or empty; the
attributes, the reference data and the audit files readable). The release is then built
in a hidden folder beside `out` and renamed into place at the end, so a refused, failed or
interrupted release leaves nothing behind:

out/cohort/            NIfTI (spacing and affine) + manifest.csv (attributes asked for,
                       synthetic = yes)
out/cohort.sha256      the SHA-256 of every file in cohort/ (common/cohort_hashes.py): a
                       site's `fedsynth audit --release` audits only a cohort that matches
out/privacy.json       the statement (server/privacy_statement.py), naming the cohort's
                       fingerprint (the SHA-256 of cohort.sha256) that the audit checks
out/ledger.jsonl       the study's ledger, from which every epsilon in it recomputes
out/site-identities.json  which identity spoke for which site (when the study bound any):
                       `fedsynth privacy verify` checks the ledger's replacements by it
out/controllability.json, out/evaluation.json (with --reference), out/audits.json
out/report.html        self-contained report (server/release_report.py)
"""

from __future__ import annotations

import json
import shlex
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

from fedsynth.common.audit_publication import check_shared
from fedsynth.common.checkpoint import load_pretrained
from fedsynth.common.cohort_hashes import write_cohort_hashes
from fedsynth.common.errors import FedsynthError
from fedsynth.common.io import PUBLIC_MODE, atomic_write_text, published_path
from fedsynth.common.models import resolve_device
from fedsynth.common.privacy_verify import (
    IDENTITIES_COPY,
    LEDGER_COPY,
    STATEMENT,
    verify_release,
)
from fedsynth.common.sampling import (
    COHORT,
    check_arguments,
    controllability,
    draw_public_attributes,
    read_attributes_csv,
    sample_cohort,
)
from fedsynth.server.finished_study import FinishedStudy, read_finished_study
from fedsynth.server.privacy_statement import privacy_statement
from fedsynth.server.release_report import write_report

EVALUATION = "evaluation.json"
AUDITS = "audits.json"


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FedsynthError(f"{out} exists and is not an empty folder; choose a new --out")
    if not out.parent.is_dir():
        raise FedsynthError(f"{out.parent} is not a folder")


def read_audits(given: Sequence[str]) -> list[dict]:
    """Sites' `fedsynth audit --json` outputs, each `FILE` or `SITE=FILE`, labelled with
    SITE (else the file's folder name). Raises FedsynthError for a file that is missing,
    not an audit, or publishing more than the sharing rule allows (an exact figure, one
    below the minimum counts; common/audit_publication.py) or no audited cohort."""
    audits = []
    for text in given:
        label, _, name = str(text).rpartition("=")
        path = Path(name).expanduser()
        try:
            audit = json.loads(path.read_text())
        except OSError as exc:
            reason = (exc.strerror or "cannot be read").lower()
            raise FedsynthError(f"--audit {path}: {reason}") from None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise FedsynthError(f"--audit {path}: not JSON") from None
        if not isinstance(audit, dict) or not audit.get("outside_dp_guarantee"):
            raise FedsynthError(f"audit {path} is not the output of fedsynth audit --json")
        if not isinstance(audit.get("dcr"), dict) or "cohort_volumes" not in audit:
            raise FedsynthError(f"audit {path} lacks dcr or cohort_volumes")
        check_shared(audit, str(path))
        audits.append({"label": label or path.resolve().parent.name, **audit})
    return audits


def _attributes(study: FinishedStudy, csv_path: str | None, n: int, seed: int) -> list[dict]:
    config = study.config
    if csv_path:
        return read_attributes_csv(csv_path, config, n)
    return draw_public_attributes(study.pretrained, config, n, seed)


def _command(
    out: Path,
    run_dir: str | Path,
    n: int,
    seed: int,
    attributes: str | None,
    reference: str | Path | None,
) -> str:
    """The command that makes this release again (the same cohort: sampling is seeded), run
    from the release folder `out`: paths beside it relative to it, others as RUNS/NAME or
    DATA/NAME, never the coordinator's folders (common/io.published_path)."""

    def here(path: str | Path, stand_in: str) -> str:
        return shlex.quote(published_path(path, out, stand_in))

    parts = ["fedsynth release --run", here(run_dir, "RUNS"), "--n", str(n), "--seed", str(seed)]
    if attributes:
        parts += ["--attributes", here(attributes, "DATA")]
    if reference is not None:
        parts += ["--reference", here(reference, "DATA")]
    return " ".join([*parts, "--out NEW_DIR"])


def release(
    run_dir: str | Path,
    n: int,
    out: str | Path,
    attributes_csv: str | None = None,
    reference: str | Path | None = None,
    audit_files: Sequence[str] = (),
    seed: int | None = None,
    device: str | None = None,
    show_progress: bool = True,
) -> dict:
    """Write a release to `out` (see module doc); returns privacy.json's content.

    Raises FedsynthError, with nothing written, when the study or an input is refused.
    """
    study = read_finished_study(run_dir)
    config = study.config
    sampling = config.sampling
    seed = config.seed if seed is None else seed
    check_arguments(n, sampling.steps, sampling.guidance_scale, sampling.scheduler, 1)
    out = Path(out).expanduser().resolve()
    _check_out(out)
    audits = read_audits(audit_files)
    if reference is not None and not (Path(reference).expanduser() / "manifest.csv").is_file():
        raise FedsynthError(f"--reference {reference}: no manifest.csv (a site-style folder)")
    if reference is not None and n < 2:
        raise FedsynthError("--reference needs --n of at least 2 (a pair, a covariance)")
    privacy_statement(study, n, reference is not None)  # refuses a non-DP study up front
    rows = _attributes(study, attributes_csv, n, seed)
    pretrained = load_pretrained(study.checkpoint, resolve_device(device or config.device))

    work = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    work.mkdir(mode=0o755)
    try:
        paths = sample_cohort(
            pretrained,
            n,
            rows,
            work,
            sampling.guidance_scale,
            sampling.steps,
            sampling.scheduler,
            seed,
            sampling.batch_size,
            show_progress,
        )
        control = controllability(study.checkpoint, work, paths, rows, sampling.guidance_scale)
        # the cohort is complete: sites audit against this record, which privacy.json names
        fingerprint = write_cohort_hashes(work)
        statement = privacy_statement(study, n, reference is not None, fingerprint)
        atomic_write_text(work / STATEMENT, json.dumps(statement, indent=2) + "\n", PUBLIC_MODE)
        shutil.copyfile(study.run_dir / "ledger.jsonl", work / LEDGER_COPY)
        (work / LEDGER_COPY).chmod(PUBLIC_MODE)
        if (study.run_dir / IDENTITIES_COPY).is_file():  # verify checks replacements by it
            shutil.copyfile(study.run_dir / IDENTITIES_COPY, work / IDENTITIES_COPY)
            (work / IDENTITIES_COPY).chmod(PUBLIC_MODE)
        verify_release(work)  # the statement recomputes from the copy, as a reader will do
        evaluation = None
        if reference is not None:
            from fedsynth.common.evaluation import evaluate_cohort

            evaluation = evaluate_cohort(
                reference, work / COHORT, study.checkpoint, seed=seed, show_progress=show_progress
            )
            # published: folder names, not the coordinator's paths
            evaluation["synthetic"]["path"] = COHORT
            evaluation["real"]["path"] = Path(str(evaluation["real"]["path"])).name
            evaluation["checkpoint"] = study.checkpoint.name
            atomic_write_text(work / EVALUATION, json.dumps(evaluation, indent=2), PUBLIC_MODE)
        if audits:
            atomic_write_text(work / AUDITS, json.dumps(audits, indent=2), PUBLIC_MODE)
        command = _command(out, run_dir, n, seed, attributes_csv, reference)
        write_report(work, study, statement, rows, control, evaluation, audits, command)
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return statement
