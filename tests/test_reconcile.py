"""reconcile: the rounds a site's own ledger holds that the server's lacks, charged exactly.

A reported (round, spend) is covered only by a server line of that round with the very
same spend, each server line covering one report (a multiset): a line of the same round
with another spend, or one line against two reports, must not hide a round the site
spent, or the server's epsilon falls below the site's own.
"""

from __future__ import annotations

from test_study_rounds import _study

from fedsynth.common.accountant import Segment, epsilon
from fedsynth.common.ledger import read_ledger
from fedsynth.server.privacy_ledger import append_line, charged_epsilon, reconcile

SITE = "site-1"
A, B = Segment(2.7, 0.8, 10), Segment(1.9, 0.8, 12)


def _ledger(study) -> list[dict]:
    return read_ledger(study.run_dir / "ledger.jsonl")


def _reported_lines(study) -> list[tuple[int, Segment]]:
    return [
        (e["round"], Segment(e["noise_multiplier"], e["sample_rate"], e["steps"]))
        for e in _ledger(study)
        if e.get("reported_by_site")
    ]


def _never_below(study, reported: list[tuple[int, Segment]]) -> None:
    privacy = study.config.privacy
    theirs = epsilon([s for _, s in reported], privacy.delta, privacy.accountant)
    assert charged_epsilon(_ledger(study), SITE, privacy) >= theirs * (1 - 1e-12)


def test_a_line_of_the_same_round_with_another_spend_does_not_cover_a_report(tmp_path):
    """The server holds round 3 at spend A; the site's ledger holds round 3 at A and
    again at B (a retried round). Only the exact match is covered: B is charged."""
    study = _study(tmp_path, 5, False)
    append_line(study, 3, SITE, A, "trained")
    reported = [(3, A), (3, B)]
    assert reconcile(study, SITE, reported, identity="node:1") == 1
    assert _reported_lines(study) == [(3, B)]
    _never_below(study, reported)


def test_a_report_that_differs_from_the_servers_line_is_charged(tmp_path):
    """The server's round-3 line says A, the site says it spent B in round 3: B counts."""
    study = _study(tmp_path, 5, False)
    append_line(study, 3, SITE, A, "trained")
    assert reconcile(study, SITE, [(3, B)], identity="node:1") == 1
    assert _reported_lines(study) == [(3, B)]
    _never_below(study, [(3, B)])


def test_one_server_line_covers_one_report_only(tmp_path):
    """Two identical reports of round 3 against one server line: one more line."""
    study = _study(tmp_path, 5, False)
    append_line(study, 3, SITE, A, "trained")
    reported = [(3, A), (3, A)]
    assert reconcile(study, SITE, reported, identity="node:1") == 1
    _never_below(study, reported)


def test_an_exact_match_is_charged_once(tmp_path):
    """What the server already holds is not charged again, report by report."""
    study = _study(tmp_path, 5, False)
    append_line(study, 2, SITE, B, "trained")
    append_line(study, 3, SITE, A, "trained")
    assert reconcile(study, SITE, [(2, B), (3, A)], identity="node:1") == 0
    assert len(_ledger(study)) == 2
    assert reconcile(study, SITE, [(2, B), (3, A), (4, A)], identity="node:1") == 1
    assert _reported_lines(study) == [(4, A)]
