"""A study's fixed terms (run-dir/terms.json, server/study_terms.py): delta, accountant,
target epsilon, min-sites and secure aggregation are fixed when it starts; a resume that
changes one is refused in one line; a terms.json that predates some gets them from the
run dir's own round records, or the resume is refused."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_run_config import declared

from fedsynth.common.config import load_config, to_yaml
from fedsynth.common.errors import FedsynthError
from fedsynth.server.finished_study import read_finished_study
from fedsynth.server.privacy_ledger import charge_estimate
from fedsynth.server.study import Study, prepare

FIXED = {
    "delta": 1e-5,
    "accountant": "rdp",
    "target_epsilon": 10.0,
    "min_sites": 2,
    "secure_aggregation": True,
}
LEGACY_KEYS = ("delta", "accountant", "study_id")  # what terms.json fixed before


def _run_config(tmp_path: Path, tiny_checkpoint: Path) -> dict:
    return declared() | {
        "config": "tiny",
        "data": "sites",
        "run-dir": str(tmp_path / "run"),
        "checkpoint": str(tiny_checkpoint),
    }


def _terms(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "run" / "terms.json").read_text())


def _one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize(
    "key,value,old,new",
    [
        ("privacy.delta", "0.04", 1e-5, 0.04),
        ("privacy.accountant", "prv", "rdp", "prv"),
        ("privacy.target-epsilon", "5", 10.0, 5.0),
        ("federation.min-sites", "3", 2, 3),
        ("federation.secure-aggregation", "false", True, False),
    ],
)
def test_a_resume_that_changes_a_fixed_term_is_refused(
    tmp_path, tiny_checkpoint, key, value, old, new
):
    run_config = _run_config(tmp_path, tiny_checkpoint)
    first = prepare(run_config)
    assert _terms(tmp_path) == {**FIXED, "study_id": first.study_id}
    (tmp_path / "run" / "ledger.jsonl").write_text("")  # the study has started
    resume = {**run_config, "resume": "true"}
    assert prepare(resume).study_id == first.study_id  # a resume keeps the study's id
    with pytest.raises(FedsynthError) as refused:
        prepare({**resume, key: value})
    said = f"this study's {key} is {old!r}, fixed when it started; the resume asks for {new!r}. "
    assert said in _one_line(refused) and "resume with the same value, or start a new" in str(
        refused.value
    )
    assert _terms(tmp_path) == {**FIXED, "study_id": first.study_id}  # nothing changed
    assert prepare({**run_config, "run-dir": str(tmp_path / "new"), key: value})  # a new study


def _legacy(tmp_path: Path, tiny_checkpoint: Path, *rounds: bool) -> dict:
    """A run dir as a study that predates the later terms left it: terms.json with delta,
    accountant and id only, a round checkpoint config.yaml per saved round, run plain
    (False) or under SecAgg+ (True)."""
    run_config = _run_config(tmp_path, tiny_checkpoint)
    prepare(run_config)
    path = tmp_path / "run" / "terms.json"
    path.write_text(json.dumps({k: v for k, v in _terms(tmp_path).items() if k in LEGACY_KEYS}))
    for number, secure in enumerate(rounds, 1):
        folder = tmp_path / "run" / "rounds" / f"round-{number:03d}"
        folder.mkdir(parents=True)
        config = load_config("tiny", {"federation.secure-aggregation": secure})
        (folder / "config.yaml").write_text(to_yaml(config))
    (tmp_path / "run" / "ledger.jsonl").write_text("")
    return {**run_config, "resume": "true"}


def test_a_study_that_predates_the_terms_keeps_what_its_rounds_ran_with(tmp_path, tiny_checkpoint):
    """A plain study whose terms.json predates secure aggregation: a resume under SecAgg+
    is refused (its rounds ran plain), a plain one goes on and completes terms.json."""
    resume = _legacy(tmp_path, tiny_checkpoint, False, False)
    study_id = _terms(tmp_path)["study_id"]
    with pytest.raises(FedsynthError) as refused:
        prepare(resume)
    said = (
        "this study's federation.secure-aggregation is False, the value its saved rounds "
        "ran with; the resume asks for True"
    )
    assert said in _one_line(refused)
    assert set(_terms(tmp_path)) == set(LEGACY_KEYS)  # a refused resume writes nothing
    assert prepare({**resume, "federation.secure-aggregation": "false"}).study_id == study_id
    assert _terms(tmp_path) == {**FIXED, "secure_aggregation": False, "study_id": study_id}
    with pytest.raises(FedsynthError, match="fixed when it started; the resume asks for True"):
        prepare(resume)


def test_a_study_that_predates_the_terms_and_ran_both_ways_is_not_resumed(
    tmp_path, tiny_checkpoint
):
    resume = _legacy(tmp_path, tiny_checkpoint, False, True)
    for secure in ("false", "true"):
        with pytest.raises(FedsynthError) as refused:
            prepare({**resume, "federation.secure-aggregation": secure})
        assert re.search(
            r"predates a fixed federation.secure-aggregation and the study's rounds ran with "
            r"different ones \(False in round\(s\) 1; True in round\(s\) 2\): it cannot be "
            r"resumed; release it as it is or start a new study",
            _one_line(refused),
        )


def test_a_study_that_predates_the_terms_with_spend_but_no_round_is_not_resumed(
    tmp_path, tiny_checkpoint
):
    """Spend charged before any round was saved (a crash in round 1): nothing shows the
    terms it was planned for. With nothing charged the study had not started: the
    resume's terms are fixed."""
    resume = _legacy(tmp_path, tiny_checkpoint)
    line = {"round": 1, "site": "site-1", "noise_multiplier": 1.0, "sample_rate": 0.5}
    line |= {"steps": 2, "delta": 1e-5, "epsilon": 1.0, "status": "trained"}
    (tmp_path / "run" / "ledger.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(FedsynthError) as refused:
        prepare(resume)
    assert "predates a fixed privacy.target-epsilon, and the study charged spend before it " in (
        _one_line(refused)
    )
    (tmp_path / "run" / "ledger.jsonl").write_text("")
    prepare(resume)
    assert {k: v for k, v in _terms(tmp_path).items() if k != "study_id"} == FIXED


def test_a_damaged_round_config_is_named_in_one_line(tmp_path, tiny_checkpoint):
    resume = _legacy(tmp_path, tiny_checkpoint, True)
    (tmp_path / "run" / "rounds" / "round-001" / "config.yaml").write_text("privacy: [")
    with pytest.raises(FedsynthError) as refused:
        prepare(resume)
    assert "round-001/config.yaml is damaged: cannot read the privacy.target-epsilon" in (
        _one_line(refused)
    )


def _charge(study: Study) -> None:
    charge_estimate(study, 1, "site-1", identity="node:1")  # a site sent round 1, no reply


def _bind(study: Study) -> None:
    (study.run_dir / "site-identities.json").write_text('{"sites": {}}\n')  # at READY


def _save_round(study: Study) -> None:
    (study.run_dir / "rounds" / "round-001").mkdir(parents=True)


@pytest.mark.parametrize("began", [_charge, _bind, _save_round], ids=["ledger", "bound", "round"])
def test_a_resume_of_a_study_whose_terms_json_is_gone_is_refused(tmp_path, tiny_checkpoint, began):
    """Fresh terms would be a new study id (the sites would stop reporting the old one's
    spend) under any terms the resume asks for (target epsilon 50 here): refused in one
    line that says how to go on, and nothing is written."""
    run_config = _run_config(tmp_path, tiny_checkpoint)
    began(prepare(run_config))
    path = tmp_path / "run" / "terms.json"
    path.unlink()
    with pytest.raises(FedsynthError) as refused:
        prepare({**run_config, "resume": "true", "privacy.target-epsilon": "50"})
    said = _one_line(refused)
    assert said.startswith(f"{path} is missing, but {tmp_path / 'run'} holds a study that began")
    assert "restore terms.json from a backup, or start a new study" in said
    assert not path.exists()


def test_a_resume_of_a_study_that_never_began_fixes_its_terms(tmp_path, tiny_checkpoint):
    """Nothing but terms.json was written (a crash before the first READY): nothing rests
    on the terms yet, so a resume without terms.json starts the study afresh."""
    run_config = _run_config(tmp_path, tiny_checkpoint)
    first = prepare(run_config)
    (tmp_path / "run" / "terms.json").unlink()
    again = prepare({**run_config, "resume": "true", "privacy.target-epsilon": "5"})
    assert again.study_id != first.study_id
    assert _terms(tmp_path) == {**FIXED, "target_epsilon": 5.0, "study_id": again.study_id}


def _replace(terms: dict, **changes: object) -> bytes:
    return json.dumps({**terms, **changes}).encode()


# a terms.json's damage (from the study's terms) -> what the refusal says
DAMAGED = {
    "not UTF-8": (lambda t: b"\xff\xfe{", "not readable JSON"),
    "torn": (lambda t: b'{"delta": 1e-5,', "not readable JSON"),
    "a list": (lambda t: b"[1, 2]", "not a JSON object"),
    "id a number": (lambda t: _replace(t, study_id=7), "its study id is not a string"),
    "id empty": (lambda t: _replace(t, study_id=""), "its study id is not a string"),
    "delta a string": (lambda t: _replace(t, delta="1e-5"), 'its delta is "1e-5", not a number'),
    "target null": (
        lambda t: _replace(t, target_epsilon=None),
        "its target_epsilon is null, not a number",
    ),
    "min-sites a float": (
        lambda t: _replace(t, min_sites=2.0),
        "its min_sites is 2.0, not a whole number",
    ),
    "secagg a number": (
        lambda t: _replace(t, secure_aggregation=1),
        "its secure_aggregation is 1, not true or false",
    ),
    "accountant a list": (
        lambda t: _replace(t, accountant=["rdp"]),
        'its accountant is ["rdp"], not a string',
    ),
}
NO_ID = {"no study id": (lambda t: json.dumps({"delta": 1e-5}).encode(), "no study id")}


@pytest.mark.parametrize("case", [*DAMAGED, *NO_ID])
def test_a_resume_with_a_damaged_terms_json_is_refused_in_one_line(tmp_path, tiny_checkpoint, case):
    damage, why = (DAMAGED | NO_ID)[case]
    run_config = _run_config(tmp_path, tiny_checkpoint)
    prepare(run_config)
    (tmp_path / "run" / "ledger.jsonl").write_text("")  # the study has started
    path = tmp_path / "run" / "terms.json"
    written = damage(_terms(tmp_path))
    path.write_bytes(written)
    with pytest.raises(FedsynthError) as refused:
        prepare({**run_config, "resume": "true"})
    said = _one_line(refused)
    assert said.startswith(f"{path} is damaged (") and why in said, said
    assert "restore it from a backup, or start a new study" in said
    assert path.read_bytes() == written  # nothing saved is lost


@pytest.mark.parametrize("case", list(DAMAGED))
def test_a_release_of_a_run_dir_with_a_damaged_terms_json_is_refused_in_one_line(
    tmp_path, tiny_checkpoint, case
):
    """A release reads terms.json as a resume does (its study id it checks against every
    saved round's): right after the ledger, whose one line here is well formed."""
    damage, why = DAMAGED[case]
    run_config = _run_config(tmp_path, tiny_checkpoint)
    prepare(run_config)
    run = tmp_path / "run"
    line = {"round": 1, "site": "site-1", "noise_multiplier": 1.0, "sample_rate": 0.5}
    line |= {"steps": 2, "delta": 1e-5, "accountant": "rdp", "epsilon": 1.0, "status": "trained"}
    (run / "ledger.jsonl").write_text(json.dumps(line) + "\n")
    (run / "state.json").write_text(json.dumps({"rounds_done": 1}))
    (run / "terms.json").write_bytes(damage(_terms(tmp_path)))
    with pytest.raises(FedsynthError) as refused:
        read_finished_study(run)
    said = _one_line(refused)
    assert said.startswith(f"{run / 'terms.json'} is damaged (") and why in said, said


def test_a_resume_whose_terms_json_is_not_a_file_is_refused(tmp_path, tiny_checkpoint):
    run_config = _run_config(tmp_path, tiny_checkpoint)
    prepare(run_config)
    path = tmp_path / "run" / "terms.json"
    path.unlink()
    path.mkdir()
    with pytest.raises(FedsynthError) as refused:
        prepare({**run_config, "resume": "true"})
    assert _one_line(refused).startswith(f"{path} is damaged (not readable JSON)")
