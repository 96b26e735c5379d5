"""Site-signed spend (common/spend_signature.py): a site signs every spending line of its
ledger, chained; the server takes a history only as the site signed it."""

from __future__ import annotations

import json
import stat

import pytest

from fedsynth.client.budget import RoundPlan, SiteBudget
from fedsynth.common.accountant import Segment
from fedsynth.common.config import load_config
from fedsynth.common.errors import FedsynthError
from fedsynth.common.spend_signature import (
    KEY_FILE,
    load_or_create_key,
    public_key_hex,
    sign,
    verify,
)
from fedsynth.server.site_replies import BadReply, _signed, check_key, check_signed

LINE = {
    "study": "s1",
    "site": "site-1",
    "round": 2,
    "noise_multiplier": 0.79,
    "sample_rate": 0.107,
    "steps": 10,
    "delta": 1e-5,
    "accountant": "rdp",
    "previous": "",
}


def test_a_signature_holds_for_its_line_and_key_only(tmp_path):
    key = load_or_create_key(tmp_path / "k.pem")
    signature = sign(key, LINE)
    assert verify(public_key_hex(key), LINE, signature)
    for field, value in (("noise_multiplier", 1.58), ("steps", 11), ("study", "s2"), ("round", 3)):
        assert not verify(public_key_hex(key), {**LINE, field: value}, signature)
    other = load_or_create_key(tmp_path / "other.pem")
    assert not verify(public_key_hex(other), LINE, signature)
    assert not verify("zz", LINE, signature) and not verify(public_key_hex(key), LINE, "00")


def test_the_key_is_created_owner_only_and_read_back(tmp_path):
    path = tmp_path / KEY_FILE
    first = load_or_create_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert public_key_hex(load_or_create_key(path)) == public_key_hex(first)
    path.write_text("not a key")
    with pytest.raises(FedsynthError, match=KEY_FILE):
        load_or_create_key(path)


def _plan(sigma: float) -> RoundPlan:
    return RoundPlan(sigma, 0.1, 10, 1e-5, 1.0, 300)


def test_a_site_signs_each_spending_line_chained_to_its_previous(tmp_path):
    budget = SiteBudget("site-1", tmp_path / "state", 100.0)
    for r, sigma in ((1, 1.2), (2, 0.9)):
        budget.record(r, _plan(sigma), study="s1", accountant="rdp")
    budget.record(3, _plan(1.0), status="refused", study="s1", accountant="rdp")
    budget.record(1, _plan(1.1), study="other", accountant="rdp")
    signed, history = budget.signed("s1"), budget.history("s1")
    assert [row[0] for row in history] == [1, 2]  # the refused line spends nothing
    (first, none), (_, previous) = signed["rows"]
    assert none == "" and previous == first  # chained within the study
    assert budget.signed("other")["rows"][0][1] == ""  # another study starts its own chain
    key_mode = (tmp_path / "state" / KEY_FILE).stat().st_mode
    assert stat.S_IMODE(key_mode) == 0o600
    rows = [(r, Segment(s, q, n)) for r, s, q, n in history]
    parsed = _signed({"signed": json.dumps(signed)}, len(rows))
    privacy = load_config("default", {"privacy.delta": 1e-5}).privacy
    check_signed(parsed, rows, "site-1", "s1", privacy)  # as the server checks it
    with pytest.raises(BadReply, match="row 2"):
        lowered = [rows[0], (2, Segment(0.9 * 2, 0.1, 10))]  # a history edited on the way
        check_signed(parsed, lowered, "site-1", "s1", privacy)
    with pytest.raises(BadReply, match="row 1"):
        check_signed(parsed, rows, "site-1", "another study", privacy)
    dropped = _signed({"signed": json.dumps({**signed, "rows": signed["rows"][1:]})}, 1)
    with pytest.raises(BadReply, match="row 1"):  # its first row no longer starts the chain
        check_signed(dropped, rows[1:], "site-1", "s1", privacy)


@pytest.mark.parametrize(
    "signed, message",
    [
        ("[", "not JSON"),
        (json.dumps({"key": "ab"}), "not {key, rows}"),
        (json.dumps({"key": "x" * 64, "rows": []}), "64 hex"),
        (json.dumps({"key": "a" * 64, "rows": []}), "do not match"),
        (json.dumps({"key": "a" * 64, "rows": [["ab", ""]]}), "no signature"),
    ],
)
def test_a_malformed_signed_metric_is_refused(signed, message):
    with pytest.raises(BadReply, match=message):
        _signed({"signed": signed}, 1)


def test_a_name_keeps_its_signing_key_while_bound_to_one_node():
    ledger = [{"site": "site-1", "identity": "node:1", "site_key": "a" * 64}]
    check_key(ledger, "site-1", "a" * 64, "node:1")
    with pytest.raises(BadReply, match="signing key differs"):
        check_key(ledger, "site-1", "b" * 64, "node:1")
    check_key(ledger, "site-1", "b" * 64, "node:4")  # rebound by the operator: a new node
    check_key(ledger, "site-2", "b" * 64, "node:1")
