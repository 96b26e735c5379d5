"""A site's own privacy terms (its node config), checked before it touches data.

The data folder in these tests does not exist: a refusal that reached the data would
fail differently (code `data`), so each test also shows nothing was read.
"""

from __future__ import annotations

import json

import pytest

from fedsynth.client.budget import RoundPlan, SiteBudget
from fedsynth.client.client_app import FAILED, ready_answer, site_round_reply
from fedsynth.client.node_config import SiteSettings, site_settings
from fedsynth.client.public_size import subject_count
from fedsynth.client.site_terms import check_delta_for_subjects
from fedsynth.common.config import load_config, to_dict
from fedsynth.common.errors import FedsynthError
from fedsynth.common.protocol import READY_METRICS, SiteStop


def _node(tmp_path, **terms):
    return {
        "data-path": str(tmp_path / "no-such-data"),
        "state-dir": str(tmp_path / "state"),
        "max-epsilon": 10,
        "site-name": "hospital-a",
        **terms,
    }


def _sent(**overrides):
    config = load_config("tiny", {"federation.secure-aggregation": True, **overrides})
    return {
        "round": 1,
        "study": json.dumps(to_dict(config)),
        "study-id": "s1",
        "checkpoint": "/nowhere",
    }


def test_a_real_site_must_state_its_own_maximum_epsilon(tmp_path):
    node = _node(tmp_path)
    del node["max-epsilon"]
    with pytest.raises(FedsynthError, match="node config lacks max-epsilon"):
        site_settings(node, target_epsilon=10.0)
    with pytest.raises(SiteStop, match="fedsynth:config:"):
        ready_answer(_sent(), node)


@pytest.mark.parametrize(
    ("terms", "study"),
    [
        ({}, {"federation.secure-aggregation": False}),  # SecAgg+ required by default
        ({"accountant": "rdp"}, {"privacy.accountant": "prv"}),
        ({"max-delta": 1e-6}, {"privacy.delta": 1e-5}),
        ({}, {"privacy.enabled": False}),  # no DP-SGD at all
    ],
    ids=["secure-aggregation", "accountant", "max-delta", "no-dp"],
)
def test_a_plan_that_breaks_the_sites_terms_is_refused_before_data(tmp_path, terms, study):
    node = _node(tmp_path, **terms)
    answer = ready_answer(_sent(**study), node)
    assert set(answer) == READY_METRICS
    assert (answer["ready"], answer["code"]) == (0, "terms")
    assert ready_answer(_sent(), _node(tmp_path))["code"] == "ready"  # the same site, fine
    log = (tmp_path / "state" / "site.log").read_text()
    assert "terms:" in log  # the details stay at the site


def test_a_plain_round_sent_to_a_site_that_requires_secure_aggregation_is_refused(tmp_path):
    """The server's claim is not trusted: the fit itself must arrive through SecAgg+."""
    with pytest.raises(SiteStop, match="fedsynth:terms:"):
        site_round_reply({}, _sent(), _node(tmp_path), secure=False)
    assert not (tmp_path / "state" / "ledger.jsonl").exists()


def test_a_study_at_another_delta_than_the_sites_ledger_is_refused(tmp_path):
    """Issue 16, item 9: epsilon cannot be composed across deltas or accountants."""
    budget = SiteBudget("hospital-a", tmp_path / "state", 10.0)
    budget.record(1, RoundPlan(2.0, 0.5, 10, 1e-6, 3.0, 20), study="s0", accountant="rdp")
    assert ready_answer(_sent(), _node(tmp_path))["code"] == "terms"
    assert ready_answer(_sent(**{"privacy.delta": 1e-6}), _node(tmp_path))["code"] == "ready"
    assert (
        ready_answer(
            _sent(**{"privacy.delta": 1e-6, "privacy.accountant": "prv"}), _node(tmp_path)
        )["code"]
        == "terms"
    )


def test_ready_says_spent_or_failed_from_the_ledger_alone(tmp_path):
    budget = SiteBudget("an old name", tmp_path / "state", 10.0)  # renamed since: still its spend
    budget.record(1, RoundPlan(0.3, 0.5, 50, 1e-5, 99.0, 20), study="s0", accountant="rdp")
    answer = ready_answer(_sent(), _node(tmp_path))
    assert (answer["ready"], answer["code"]) == (0, "budget-spent")
    assert json.loads(answer["history"]) == []  # another study's rounds are not this one's
    assert answer["epsilon"] == 0.0
    (tmp_path / "state" / "ledger.jsonl").unlink()
    (tmp_path / "state" / FAILED).write_text("{}")
    assert ready_answer(_sent(), _node(tmp_path))["code"] == "failed-before"
    with pytest.raises(SiteStop, match="fedsynth:failed-before:"):
        site_round_reply({}, _sent(), _node(tmp_path), secure=True)


@pytest.mark.parametrize(
    ("delta", "max_delta", "refused"),
    [(0.04, None, False), (0.05, None, True), (0.3, 0.4, False), (0.5, 0.9, True)],
)
def test_delta_must_be_below_one_over_ten_n_unless_the_site_allows_more(
    tmp_path, delta, max_delta, refused
):
    terms = {"disclose-subject-count": True}  # n is public: checked for n itself
    terms |= {} if max_delta is None else {"max-delta": max_delta}
    settings = site_settings(_node(tmp_path, **terms), target_epsilon=10.0)
    if refused:  # n = 2: 1/(10 n) = 0.05 by default; with max-delta set, 1/n = 0.5
        with pytest.raises(SiteStop, match="fedsynth:terms:"):
            check_delta_for_subjects(settings, delta, 2)
    else:
        check_delta_for_subjects(settings, delta, 2)


@pytest.mark.parametrize("max_delta", [None, 0.5])
def test_a_delta_refusal_tells_no_more_than_the_published_size(tmp_path, max_delta):
    """Without the opt-in a site of 347 is checked as 349, the largest count publishing
    340: the server, which picks delta, cannot tell 340..349 apart by refusals (checked
    against n, 347 accepts 1/(10 * 348), which 349 refuses)."""
    terms = {} if max_delta is None else {"max-delta": max_delta}
    settings = site_settings(_node(tmp_path, **terms), target_epsilon=10.0)
    factor = 1 if max_delta is not None else 10
    for delta in (1 / (factor * 348), 1 / (factor * 349), 1 / (factor * 350)):
        refusals = set()
        for n in range(340, 350):
            try:
                check_delta_for_subjects(settings, delta, n)
                refusals.add(False)
            except SiteStop:
                refusals.add(True)
        assert len(refusals) == 1, delta  # one answer for the whole bucket
    with pytest.raises(SiteStop, match="fedsynth:terms:"):  # stricter than n = 347
        check_delta_for_subjects(settings, 1 / (factor * 348), 347)
    check_delta_for_subjects(settings, 0.999 / (factor * 349), 347)
    with pytest.raises(SiteStop, match="fedsynth:terms:"):  # below 10 subjects: as 9
        check_delta_for_subjects(settings, 1 / (factor * 9), 2)


def _answer(settings: SiteSettings, delta: float, n: int) -> str:
    """What the server sees of the check: a refusal's code, or ready."""
    try:
        check_delta_for_subjects(settings, delta, n)
    except SiteStop as stop:
        return stop.code
    return "ready"


def test_a_declared_size_without_max_delta_does_not_tell_the_real_bucket(tmp_path):
    """A site that declares public-subjects=100 publishes 100 and nothing else of n: 347
    and 1234 (different rounding buckets) must answer a study's delta alike (the server
    picks delta per study; 1e-4 is below 1/(10 x 349), not below 1/(10 x 1299))."""
    settings = SiteSettings(  # built directly: site_settings refuses it (no max-delta)
        "site", tmp_path / "data", tmp_path / "state", 10.0, public_subjects=100
    )
    for delta in (1e-6, 1e-4, 1e-3):
        assert _answer(settings, delta, 347) == _answer(settings, delta, 1234) == "config"
    declared = _declared(tmp_path, 1e-4)  # with a max-delta: both publish 100
    assert subject_count(declared, 347).public == subject_count(declared, 1234).public == 100
    assert _answer(declared, 1e-4, 347) == _answer(declared, 1e-4, 1234) == "ready"


def _declared(tmp_path, max_delta: float) -> SiteSettings:
    node = _node(tmp_path, **{"public-subjects": 100, "max-delta": max_delta})
    return site_settings(node, target_epsilon=10.0)


def test_a_declared_size_answers_from_the_node_config_alone(tmp_path):
    """With max-delta 8e-4 (below 1/1234 and 1/347) the answer to each delta is the
    same for n = 347 and 1234: ready up to max-delta, `terms` above. A check for the top
    of n's bucket (1/1299 = 7.7e-4 for 1234) would refuse 8e-4 for 1234 only."""
    settings = _declared(tmp_path, 8e-4)
    for delta, expected in ((1e-6, "ready"), (7.9e-4, "ready"), (8e-4, "ready"), (9e-4, "terms")):
        assert [_answer(settings, delta, n) for n in (347, 1234)] == [expected] * 2, delta


def test_a_declared_size_with_max_delta_above_one_over_n_refuses_every_study_alike(
    tmp_path, caplog
):
    """max-delta 9e-4 is not below 1/1234: that site refuses every delta with `config`
    (one study-independent answer, the reason in its own log), so the server cannot
    narrow n down by choosing deltas."""
    settings = _declared(tmp_path, 9e-4)
    answers = {_answer(settings, delta, 1234) for delta in (1e-8, 1e-4, 7.9e-4, 9e-4, 0.5)}
    assert answers == {"config"}
    assert "needs a max-delta below 1/n" in (tmp_path / "state" / "site.log").read_text()
    assert _answer(settings, 1e-4, 1100) == "ready"  # 9e-4 < 1/1100


@pytest.mark.usefixtures("one_thread")
def test_the_one_over_ten_n_check_runs_before_the_round_spends(
    tmp_path, tiny_checkpoint, phantom_root
):
    """Wired into the real round: site-1 has 2 subjects, so delta 0.06 > 1/(10 n)."""
    from fedsynth.common.checkpoint import load_pretrained, public_sha256

    node = {
        "data-path": str(phantom_root / "site-1"),
        "state-dir": str(tmp_path / "state"),
        "max-epsilon": 10,
        "site-name": "site-1",
    }
    weights = {k: v.clone() for k, v in load_pretrained(tiny_checkpoint).unet.state_dict().items()}
    sent = {
        **_sent(**{"privacy.delta": 0.06}),
        "checkpoint": str(tiny_checkpoint),
        "checkpoint-sha256": public_sha256(tiny_checkpoint, weights, []),
    }  # all sent
    with pytest.raises(SiteStop, match="fedsynth:terms:"):
        site_round_reply(weights, sent, node, secure=True)
    assert not (tmp_path / "state" / "ledger.jsonl").exists()  # nothing spent
    assert "for 2 subjects" in (tmp_path / "state" / "site.log").read_text()


@pytest.mark.parametrize(
    ("sampled", "threshold", "refused"), [(3, 2, False), (3, 1, True), (1, 1, True), (2, 2, False)]
)
def test_a_secagg_setup_that_could_unmask_one_site_is_refused(sampled, threshold, refused):
    """Flower's secaggplus_mod accepts a threshold of 1; the site does not."""
    from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

    from fedsynth.client.client_app import check_secagg_setup

    configs = {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: sampled, Key.THRESHOLD: threshold}
    if refused:
        with pytest.raises(SiteStop, match="fedsynth:terms:"):
            check_secagg_setup(configs)
    else:
        check_secagg_setup(configs)
    check_secagg_setup({Key.STAGE: Stage.UNMASK})  # only the setup stage carries them
