"""`fedsynth privacy verify` checks a published ledger's history as the release did
(common/ledger_history.py): each line's epsilon from the lines before it, and each
replacement of a no-reply estimate (a reported trained line of the same site and round
with steps > 0, each estimate once, from an identity that speaks for the estimate's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fedsynth.common.accountant import epsilon
from fedsynth.common.errors import FedsynthError
from fedsynth.common.ledger import charged, segment_of
from fedsynth.common.privacy_verify import verify_release
from fedsynth.common.spend_signature import sign

DELTA = 1e-5
KEY_A, KEY_B = ("key:" + c * 64 for c in "ab")


def _line(round_number: int, sigma: float, rate: float, steps: int, status: str, **extra):
    return {
        "round": round_number,
        "site": "site-1",
        "noise_multiplier": sigma,
        "sample_rate": rate,
        "steps": steps,
        "delta": DELTA,
        "epsilon": 0.0,
        "accountant": "rdp",
        "status": status,
        **extra,
    }


SITE_KEY = Ed25519PrivateKey.from_private_bytes(bytes(32))  # the site's, fixed for the test


def _signed(line: dict, previous: str) -> dict:
    """`line` with the site's signature, as the server keeps it on a line it charges."""
    fields = {**line, "study": "study-1", "previous": previous}
    key = SITE_KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
    return {
        **line,
        "site_key": key,
        "site_signature": sign(SITE_KEY, fields),
        "site_previous": previous,
    }


def _release(folder: Path, lines: list[dict], identities: dict | None = None) -> list[dict]:
    """A release folder whose ledger lines each state the epsilon the lines up to them
    give (as the server writes them) and whose statement is what `charged` gives; each
    spending line but an estimate signed by the site, chained."""
    ledger, previous = [], ""
    for line in lines:
        if line["status"] == "trained" and line["steps"] > 0:
            line.update(_signed(line, previous))
            previous = line["site_signature"]
        ledger.append(line)
        line["epsilon"] = epsilon([segment_of(e) for e in charged(ledger, "site-1")], DELTA, "rdp")
    counted = charged(ledger, "site-1")
    value = epsilon([segment_of(e) for e in counted], DELTA, "rdp")
    statement = {
        "study_id": "study-1",
        "site_keys": {
            "site-1": SITE_KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
        },
        "delta": DELTA,
        "accountant": "rdp",
        "study_epsilon": value,
        "guarantee": f"({value:.4g}, {DELTA:g})-DP per subject",
        "sites": {
            "site-1": {
                "epsilon": value,
                "delta": DELTA,
                "noise_multipliers": [float(e["noise_multiplier"]) for e in counted],
                "sample_rates": [float(e["sample_rate"]) for e in counted],
                "steps": [int(e["steps"]) for e in counted],
                "rounds": sorted({int(e["round"]) for e in counted}),
            }
        },
    }
    (folder / "privacy.json").write_text(json.dumps(statement))
    (folder / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in ledger))
    if identities is not None:
        (folder / "site-identities.json").write_text(json.dumps(identities))
    return ledger


def _estimate(identity: str = KEY_A) -> dict:
    return _line(2, 1.0, 1.0, 40, "no-reply", estimate="2-0123456789ab", identity=identity)


def _report(steps: int = 10, identity: str = KEY_A, **extra) -> dict:
    return _line(
        2,
        1.0,
        0.1 if steps else 0.0,
        steps,
        "trained",
        reported_by_site=True,
        identity=identity,
        replaces_estimate="2-0123456789ab",
        **extra,
    )


def test_a_true_replacement_verifies(tmp_path: Path) -> None:
    _release(tmp_path, [_line(1, 1.0, 0.1, 10, "trained", identity=KEY_A), _estimate(), _report()])
    assert set(verify_release(tmp_path)) == {"site-1"}


@pytest.mark.parametrize(
    "replacing",
    [
        # a refused line of 0 steps: never the site's report, charges nothing
        _line(2, 0.0, 0.0, 0, "refused", replaces_estimate="2-0123456789ab"),
        _report(steps=0),  # a reported line of 0 steps that settles with no beside line
        _line(3, 1.0, 0.1, 10, "trained", reported_by_site=True, identity=KEY_A,
              replaces_estimate="2-0123456789ab"),  # another round
        _report(identity=KEY_B),  # an identity no attestation links to the estimate's
    ],
    ids=["refused", "zero-steps", "other-round", "other-identity"],
)  # fmt: skip
def test_verify_refuses_a_line_that_cannot_replace_the_estimate(
    tmp_path: Path, replacing: dict
) -> None:
    ledger = [_line(1, 1.0, 0.1, 10, "trained", identity=KEY_A), _estimate(), dict(replacing)]
    _release(tmp_path, ledger)
    assert [e["round"] for e in charged(ledger, "site-1") if e.get("estimate")] == []
    with pytest.raises(FedsynthError, match=r"ledger.jsonl, line 3: replaces estimate"):
        verify_release(tmp_path)


def test_an_estimate_is_replaced_once(tmp_path: Path) -> None:
    _release(tmp_path, [_estimate(), _report(), _report()])
    with pytest.raises(FedsynthError, match=r"line 3: replaces estimate"):
        verify_release(tmp_path)


def test_an_attested_successor_verifies_with_the_shipped_identities(tmp_path: Path) -> None:
    attested = {
        "bindings": {},
        "released": [],
        "same_site": [{"site": "site-1", "from": KEY_A, "to": KEY_B, "by": "operator"}],
    }
    _release(tmp_path, [_estimate(), _report(identity=KEY_B)], attested)
    verify_release(tmp_path)
    (tmp_path / "site-identities.json").unlink()
    with pytest.raises(FedsynthError, match=r"line 2: replaces estimate"):
        verify_release(tmp_path)


def test_a_deleted_line_is_found(tmp_path: Path) -> None:
    """Round 2's line taken out and the statement rewritten to match: round 3's line still
    says the epsilon after all three rounds."""
    written = _release(
        tmp_path, [_line(r, 1.0, 0.1, 10, "trained", identity=KEY_A) for r in (1, 2, 3)]
    )
    kept = [dict(written[0]), dict(written[2])]
    _release(tmp_path, [dict(e) for e in kept])  # the statement of the two lines left
    (tmp_path / "ledger.jsonl").write_text("".join(json.dumps(e) + "\n" for e in kept))
    with pytest.raises(FedsynthError, match=r"line 2: says site-1 is at epsilon"):
        verify_release(tmp_path)
