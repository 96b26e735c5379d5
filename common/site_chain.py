"""The site identities file (site-identities.json, server/site_identity.py writes it) read
and checked, and the same-site chains it attests: shared by the server (which writes the
file and replaces estimates by it) and by anyone who checks a ledger's replacements
(server/finished_study.py before a release, `fedsynth privacy verify` after it).

An identity is `key:<64 hex>` (SHA-256 of a node's public key) or `node:<int>`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from fedsynth.common.errors import FedsynthError

IDENTITY = re.compile(r"key:[0-9a-f]{64}|node:-?[0-9]+")


def is_identity(value: object) -> bool:
    """`key:<64 hex>` or `node:<int>`: what server/site_identity.node_identity makes."""
    return isinstance(value, str) and IDENTITY.fullmatch(value) is not None


def _optional_int(value: object) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool))


def _valid_binding(binding: object) -> bool:
    return (
        isinstance(binding, dict)
        and is_identity(binding.get("identity"))
        and _optional_int(binding.get("run"))
        and _optional_int(binding.get("node"))
        and isinstance(binding.get("bound"), str)
        and isinstance(binding.get("simulated", False), bool)
    )


def _valid_release(record: object) -> bool:
    return (
        isinstance(record, dict)
        and isinstance(record.get("site"), str)
        and is_identity(record.get("identity"))
        and record.get("by") in ("operator", "simulation")
    )


def _valid_attestation(record: object) -> bool:
    return (
        isinstance(record, dict)
        and isinstance(record.get("site"), str)
        and is_identity(record.get("from"))
        and is_identity(record.get("to"))
        and record.get("by") in ("operator", "simulation")
    )


def read_identities_file(path: Path) -> dict[str, Any]:
    """The bindings, releases and attestations in `path`; empty ones when it is missing
    (no site was bound). Every record is checked strictly (identities as above, the other
    fields' types). Raises FedsynthError naming the file otherwise."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {"bindings": {}, "released": [], "same_site": []}
    except (OSError, ValueError):
        raise FedsynthError(f"{path}: not a readable site identities file") from None
    if not isinstance(data, dict):
        raise FedsynthError(f"{path}: not a site identities file (bindings, released)")
    data.setdefault("same_site", [])  # files written before attestations
    parts = [("bindings", dict), ("released", list), ("same_site", list)]
    for key, kind in parts:
        if not isinstance(data.get(key), kind):
            raise FedsynthError(f"{path}: {key} is not a JSON {kind.__name__}")
    for site, binding in data["bindings"].items():
        if not _valid_binding(binding):
            raise FedsynthError(
                f"{path}: the binding of {site!r} is not an identity (key:<64 hex> or "
                "node:<int>) with its run, node, bound and simulated fields"
            )
    checks = (("released", _valid_release), ("same_site", _valid_attestation))
    for key, valid in checks:
        for number, record in enumerate(data[key], 1):
            if not valid(record):
                raise FedsynthError(f"{path}: {key} record {number} is not well formed")
    return data


def same_site_identities(data: dict[str, Any], site: str, identity: str) -> set[str | None]:
    """`identity` and every identity it speaks for at `site` by a chain of same-site
    attestations (each old -> new); None too when the chain holds the first identity the
    name was bound to (which estimates written before estimates named an identity count
    as)."""
    speaks: set[str | None] = {identity}
    todo = [identity]
    while todo:
        current = todo.pop()
        for edge in data["same_site"]:
            if edge["site"] == site and edge["to"] == current and edge["from"] not in speaks:
                speaks.add(edge["from"])
                todo.append(edge["from"])
    released = [r["identity"] for r in data["released"] if r["site"] == site]
    bound = data["bindings"].get(site, {}).get("identity")
    first = released[0] if released else bound
    if first is not None and first in speaks:
        speaks.add(None)
    return speaks
