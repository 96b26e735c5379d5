"""A finished study read back from its run dir, checked before anything is released.

A release states an epsilon for every site; it must be the one the study's ledger proves.
So every check here reads, never writes, and raises FedsynthError with one line naming the
file and the fault:
- the ledger is missing, unreadable, torn (a crash mid-append) or holds a line of another
  delta or accountant than the study's fixed terms (terms.json);
- the study stopped mid-round (the ledger charges a round after the last saved one, or the
  summary lags the last saved round) or before its planned rounds without a stated reason;
- the epsilon recomputed from the ledger differs from summary.json, or exceeds the study's
  target for any site (a no-reply estimate lands on the target up to
  privacy_ledger.ESTIMATE_TOLERANCE, relative, and is accepted there);
- the checkpoint is not the one the study saved (SHA-256 of both networks against
  state.json and summary.json).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

import yaml

from fedsynth.common.config import Config, PrivacyConfig, config_from_dict
from fedsynth.common.errors import FedsynthError
from fedsynth.common.io import read_json_object
from fedsynth.common.ledger import charged, read_ledger
from fedsynth.common.ledger_history import check_history
from fedsynth.server.privacy_ledger import ESTIMATE_TOLERANCE, site_epsilons
from fedsynth.server.run_dir import LEDGER, STATE, SUMMARY, checkpoint_hashes, round_dir
from fedsynth.server.site_identity import read_identities
from fedsynth.server.study_terms import FIXED, TERMS, read_terms

TOLERANCE = 1e-9  # relative: the same accountant on the same history gives the same float
IN_LINES = ("delta", "accountant")  # the fixed terms every ledger line carries


@dataclass(frozen=True)
class FinishedStudy:
    """What a release is made from; every field checked against the others."""

    run_dir: Path
    config: Config  # the final round checkpoint's config.yaml (the study's)
    ledger: list[dict]
    summary: dict
    terms: dict
    checkpoint: Path  # the last round's checkpoint folder
    pretrained: Path  # the public checkpoint the study started from
    site_epsilon: dict[str, float]  # recomputed from the ledger

    @property
    def rounds_done(self) -> int:
        return int(self.summary["rounds_done"])

    def round_metadata(self, number: int) -> dict:
        return _json(round_dir(self.run_dir, number) / "metadata.json")


def _json(path: Path) -> dict:
    return read_json_object(path, "the run dir is incomplete or damaged")


def _read_ledger(run_dir: Path) -> list[dict]:
    path = run_dir / LEDGER
    if path.exists() and not path.is_file():
        raise FedsynthError(f"{path} is not a file")
    if not path.is_file():
        raise FedsynthError(
            f"{path} is missing: nothing proves what the study spent, so nothing is released"
        )
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        raise FedsynthError(
            f"{path} ends in a torn line (the study crashed while charging a round): "
            "resume the study (-c resume=true) to finish the round, then release"
        )
    ledger = read_ledger(path)  # a bad line: FedsynthError naming it
    if not ledger:
        raise FedsynthError(f"{path} is empty: no round was charged, there is nothing to release")
    return ledger


def _whole(value: object, low: int) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _real(value: object, low: float, high: float) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return low <= value <= high


def _check_line_types(ledger: list[dict], where: Path) -> None:
    """Each line's fields have the types and ranges the accounting needs (a steps of 2.9
    would count as 2; a round of "2" would sort wrongly)."""
    for number, e in enumerate(ledger, 1):
        checks = {
            "site": isinstance(e["site"], str) and e["site"] != "",
            "round": _whole(e["round"], 1),
            "steps": _whole(e["steps"], 0),
            "noise_multiplier": _real(e["noise_multiplier"], 0.0, math.inf),
            "sample_rate": _real(e["sample_rate"], 0.0, 1.0),
            "epsilon": _real(e["epsilon"], 0.0, math.inf),
        }
        bad = [key for key, ok in checks.items() if not ok]
        if bad:
            raise FedsynthError(
                f"{where}, line {number}: {bad[0]} {e[bad[0]]!r} is not a valid value"
            )


def _check_line_history(ledger: list[dict], privacy: PrivacyConfig, where: Path) -> None:
    """Each line's epsilon recomputed from the lines before it, and each replacement of an
    estimate checked against the run dir's site-identities.json (common/ledger_history.py,
    the check `fedsynth privacy verify` runs on the published copy too)."""
    identities = read_identities(where.parent)
    check_history(ledger, identities, privacy.delta, privacy.accountant, where)


def _check_terms(
    ledger: list[dict], terms: dict, summary: dict, config: Config, where: Path
) -> None:
    """The fixed terms (server/study_terms.py) hold in the checkpoint's config, the summary
    and every ledger line. Delta and accountant are always fixed; a terms.json that
    predates a later term leaves it to the per-round records (the statement reads those)."""
    fixed = {t.key: terms.get(t.key) for t in FIXED if t.key in terms or t.key in IN_LINES}
    ours = {t.key: t.value(config) for t in FIXED}
    for key, value in fixed.items():
        if ours[key] != value or summary.get(key) != value:
            raise FedsynthError(
                f"{where}: terms.json fixes {key} {value!r}, the checkpoint's config says "
                f"{ours[key]!r} and summary.json {summary.get(key)!r}"
            )
    for number, entry in enumerate(ledger, 1):
        for key in IN_LINES:
            value = fixed[key]
            if key in entry and entry[key] != value:
                raise FedsynthError(
                    f"{where / LEDGER}, line {number}: {key} {entry[key]!r}, but the study's "
                    f"terms fix {value!r}; epsilon cannot be composed across them"
                )


def _check_complete(ledger: list[dict], state: dict, summary: dict, run_dir: Path) -> int:
    for name, record in ((STATE, state), (SUMMARY, summary)):
        for key in ("rounds_done", "rounds_planned") if name == SUMMARY else ("rounds_done",):
            if not _whole(record.get(key), 0):
                raise FedsynthError(f"{run_dir / name}: {key} {record.get(key)!r} is not a count")
    done = state["rounds_done"]
    if done < 1:
        raise FedsynthError(f"{run_dir}: no round was saved, there is nothing to release")
    last_charged = max(int(e["round"]) for e in ledger)
    if last_charged > done:
        raise FedsynthError(
            f"{run_dir}: the ledger charges round {last_charged} but the last saved round is "
            f"{done}: the study stopped mid-round; resume it (-c resume=true), then release"
        )
    if summary["rounds_done"] != done:
        raise FedsynthError(
            f"{run_dir}: summary.json says {summary.get('rounds_done')} rounds, state.json "
            f"{done}: the study stopped mid-round; resume it (-c resume=true), then release"
        )
    planned = summary["rounds_planned"]
    if done < planned and not summary.get("ended_early"):
        raise FedsynthError(
            f"{run_dir}: {done} of {planned} rounds done and the study did not end: it was "
            "stopped; resume it (-c resume=true), then release"
        )
    return done


def _check_rounds(study: FinishedStudy) -> None:
    """Every saved round names this study and has at least as many trained lines as it
    says sites trained (a deleted round would otherwise go unnoticed)."""
    where = study.run_dir / LEDGER
    for number in range(1, study.rounds_done + 1):
        metadata = study.round_metadata(number)
        if metadata.get("study_id") != study.terms.get("study_id"):
            raise FedsynthError(
                f"{round_dir(study.run_dir, number)}: not a round of this study (its study "
                f"id {metadata.get('study_id')!r}, terms.json {study.terms.get('study_id')!r})"
            )
        lines = [
            e
            for e in study.ledger
            if e["round"] == number and e["status"] == "trained" and not e.get("reported_by_site")
        ]
        trained = metadata.get("sites_trained")
        if not _whole(trained, 0) or len(lines) < trained:
            raise FedsynthError(
                f"{where}: round {number} was saved with {trained!r} sites trained, the "
                f"ledger holds {len(lines)} trained line(s) for it"
            )


def _check_epsilons(ledger: list[dict], summary: dict, config: Config, run_dir: Path) -> dict:
    recomputed = site_epsilons(ledger, config)
    stated = summary.get("site_epsilon")
    if not isinstance(stated, dict) or set(stated) != set(recomputed):
        raise FedsynthError(
            f"{run_dir / SUMMARY}: its sites ({', '.join(sorted(stated or {})) or 'none'}) "
            f"are not the ledger's ({', '.join(sorted(recomputed))})"
        )
    for site, value in recomputed.items():
        if not _real(stated[site], 0.0, math.inf):
            raise FedsynthError(f"{run_dir / SUMMARY}: {site} epsilon {stated[site]!r}")
        if not math.isclose(float(stated[site]), value, rel_tol=TOLERANCE, abs_tol=TOLERANCE):
            raise FedsynthError(
                f"{run_dir / SUMMARY}: {site} epsilon {float(stated[site]):.6g}, but its "
                f"ledger gives {value:.6g}"
            )
        target = config.privacy.target_epsilon
        if value > target * (1 + ESTIMATE_TOLERANCE):  # a no-reply estimate lands in there
            raise FedsynthError(
                f"{run_dir / LEDGER}: {site} epsilon {value:.6g} exceeds the study's target "
                f"{target:g}{_over_target_why(ledger, site, run_dir)}; such a study is not "
                "released"
            )
    return recomputed


def _over_target_why(ledger: list[dict], site: str, run_dir: Path) -> str:
    """Why a site stands above the target, and what the operator can do: an estimate
    charged to one identity still counts beside the true lines the site reported for the
    same rounds as another, which no same-site attestation links to it."""
    estimates = [e for e in charged(ledger, site) if e.get("estimate")]
    if not estimates:
        return ""
    rounds = {e["round"] for e in estimates}
    old = sorted(
        {str(e.get("identity") or "an identity before estimates named one") for e in estimates}
    )
    new = sorted(
        {
            str(e.get("identity"))
            for e in charged(ledger, site)
            if e.get("reported_by_site") and e["round"] in rounds
        }
    )
    from_old = f" --from {old[0]}" if len(old) == 1 and old[0].startswith(("key:", "node:")) else ""
    if not new:
        return f" ({len(estimates)} no-reply estimate(s) its own ledger has not replaced)"
    return (
        f": {len(estimates)} no-reply estimate(s) charged to {', '.join(old)} still count "
        f"beside the same round(s) it reported as {', '.join(new)}, which no same-site "
        "attestation links to them; if that is the same site, `fedsynth unbind-site --run "
        f"{run_dir} --site {site} --same-site {new[-1]}{from_old} --reason TEXT` attests it and "
        "settles them, then release again"
    )


def _check_checkpoint(state: dict, summary: dict, run_dir: Path, done: int) -> Path:
    folder = round_dir(run_dir, done)
    for name, record in ((STATE, state), (SUMMARY, summary)):  # a moved run dir still holds
        if Path(str(record.get("checkpoint") or "")).parts[-2:] != folder.parts[-2:]:
            raise FedsynthError(
                f"{run_dir / name}: names checkpoint {record.get('checkpoint')!r}, not the "
                f"last saved round {folder}"
            )
    stated = state.get("sha256")
    if not isinstance(stated, dict) or summary.get("checkpoint_sha256") != stated:
        raise FedsynthError(
            f"{run_dir}: state.json and summary.json do not agree on the checkpoint's "
            "SHA-256 (or the study predates checkpoint hashes): cannot show the checkpoint "
            "is this study's"
        )
    try:
        actual = checkpoint_hashes(folder)
    except OSError:
        raise FedsynthError(f"{folder}: the checkpoint's networks cannot be read") from None
    for name, digest in actual.items():
        if stated.get(name) != digest:
            raise FedsynthError(
                f"{folder / name}: SHA-256 differs from the one the study recorded: this "
                "checkpoint is not the one the study saved"
            )
    return folder


def read_finished_study(run_dir: str | Path) -> FinishedStudy:
    """Check a study's run dir for release (see module doc); writes nothing.

    Raises FedsynthError with one line naming the file and the fault.
    """
    run_dir = Path(run_dir).expanduser().resolve()
    if not run_dir.is_dir():
        raise FedsynthError(f"run dir {run_dir} is not a folder")
    for name in (LEDGER, STATE, SUMMARY, TERMS, "rounds"):
        if (run_dir / name).is_symlink():
            raise FedsynthError(
                f"{run_dir / name} is a symbolic link: a release reads only the run dir's own files"
            )
    ledger = _read_ledger(run_dir)
    _check_line_types(ledger, run_dir / LEDGER)
    state, terms = _json(run_dir / STATE), read_terms(run_dir / TERMS)
    if not (run_dir / SUMMARY).is_file():
        raise FedsynthError(
            f"{run_dir}: no summary.json after round {state.get('rounds_done')}: the study "
            "stopped mid-round; resume it (-c resume=true), then release"
        )
    summary = _json(run_dir / SUMMARY)
    done = _check_complete(ledger, state, summary, run_dir)
    checkpoint = _check_checkpoint(state, summary, run_dir, done)
    try:
        config = config_from_dict(yaml.safe_load((checkpoint / "config.yaml").read_text()))
    except (OSError, yaml.YAMLError):
        raise FedsynthError(f"{checkpoint / 'config.yaml'} is missing or damaged") from None
    _check_terms(ledger, terms, summary, config, run_dir)
    if summary.get("secure_aggregation") is not config.federation.secure_aggregation:
        raise FedsynthError(
            f"{run_dir / SUMMARY}: secure_aggregation {summary.get('secure_aggregation')!r}, "
            f"the study's config says {config.federation.secure_aggregation!r}"
        )
    _check_line_history(ledger, config.privacy, run_dir / LEDGER)
    epsilons = _check_epsilons(ledger, summary, config, run_dir)
    pretrained = Path(str(summary.get("pretrained") or "")).expanduser()
    study = FinishedStudy(run_dir, config, ledger, summary, terms, checkpoint, pretrained, epsilons)
    _check_rounds(study)
    return study
