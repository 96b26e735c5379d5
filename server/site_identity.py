"""Which identity speaks for which site: each site's name bound, for good, to the
authenticated identity that first claimed it, and kept in the run dir.

A site's name keys its lines in the server's ledger, so whoever answers READY under a name
is believed about that site's history (server/privacy_ledger.py reconcile). A name is
therefore bound to an identity the SuperLink authenticated, not to whichever node claims
it, and never handed to another identity without the operator (`fedsynth unbind-site`).

What the identity is, from Flower 1.41's source:
- Under node authentication (the deployment: `flower-superlink --enable-supernode-auth`,
  keys registered with `flwr supernode register`, deploy/register-sites.sh) the node id
  is drawn at random once, when the key is registered (linkstate `create_node`); a
  SuperNode that restarts with its key activates by it (fleet_handlers.activate_node:
  `get_node_id_by_public_key`) and gets the same node id back. The ServerApp can read each
  node's public key: `grid.get_nodes()` returns linkstate NodeInfo records, `public_key`
  included (the Runtime API's GetNodes). The key is the identity: it is what the
  coordinator registered, and it survives what the node id does not (a SuperLink restarted
  without `--database`, a key unregistered and registered again gets a new node id).
  Identity `key:<SHA-256 of the public key, hex>`.
- Without node authentication a SuperNode makes a fresh key pair at every start and
  registers itself (flwr/supernode/fleet_http_connection.py), so a restart is a new
  identity, and so is an impostor: the site is refused until the operator unbinds it.
- A grid that reports no key (the in-process loopback grid of the tests and the bench:
  flwr's base `Grid.get_nodes`) gives node ids only, fixed by whoever built the grid, the
  same across a resume: identity `node:<id>`.
- A `flwr run` simulation draws every node's id and key at random in each run
  (flwr/server/superlink/fleet/vce/vce_api.py `_register_nodes`: random id, 32 random key
  bytes), so neither survives a resume, and no node outside the run can join it (the
  simulation has no Fleet API). A simulated study's run (run config `data="phantoms"`)
  therefore binds its names for one Flower run, and marks them `simulated`: such a binding
  made in an earlier run is released when a simulated run first asks READY (logged and
  recorded like the operator's). A binding a real run made (or one written before
  bindings said which: conservatively real) is never released by a run's config.

Claims at a READY: the bound identity keeps its name; any other identity claiming it is
refused (one warning line naming its identity; the node is not picked, its history is not
reconciled, nothing is written for it), as is an identity that already speaks for another
name. A name no one holds yet goes to its claimant, unless two identities claim it in the
same READY: then neither gets it (the operator must take one off). The binding is written
(atomically, under a lock the CLI shares) before the READY writes any ledger line for that
site. A missing file while the ledger charges identities is refused (it would free every
name), as is a file whose bindings are not what this module writes.

Same site, new identity: an estimate (server/privacy_ledger.py) is replaced only by a
report from an identity that speaks for the identity it was charged to: itself, or a
successor by a chain of `same_site` attestations, each old -> new for one name. The
operator attests one with `fedsynth unbind-site --same-site IDENTITY [--from OLD]` (the
name passes to IDENTITY; OLD, an identity that held the name, is needed unless exactly
one could be meant: the one bound now or released and not yet attested; never guessed
among several, since one may be another node that took the name after a plain unbind,
whose estimates must stay); a simulated run records one for each name it binds after its simulation
released it (the same phantom site: its state folder is the run dir's, and no outside
node can join). A plain unbind attests nothing: the new identity's reports only add. An
estimate written before estimates named an identity counts as charged to the first
identity the name was bound to in this run dir (the first claim after it; its successors
by attestation may replace it too).

run-dir/site-identities.json:
  {"bindings": {site: {"identity", "run" (Flower run id, null when the operator bound it),
                       "node" (null likewise), "bound" (UTC), "simulated" (bool)}},
   "released": [{"site", "identity", "released" (UTC), "by" ("operator"|"simulation"),
                 "reason"}, ...],
   "same_site": [{"site", "from", "to" (identities), "by", "at" (UTC), "reason"}, ...]}
An identity is `key:<64 hex>` or `node:<int>`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flwr.proto.node_pb2 import NodeInfo

from fedsynth.common.errors import FedsynthError
from fedsynth.common.io import atomic_write_text
from fedsynth.common.ledger import ledger_lock, read_ledger
from fedsynth.common.site_chain import (
    is_identity,
    read_identities_file,
)
from fedsynth.server.run_dir import LEDGER

log = logging.getLogger(__name__)

SITE_IDENTITIES = "site-identities.json"

Claim = tuple[int, str, str]  # (node id, its identity, the site name it claims)


def node_identity(info: NodeInfo) -> str:
    """`key:<sha256>` of the node's public key, or `node:<id>` when the grid gives none."""
    if info.public_key:
        return "key:" + hashlib.sha256(info.public_key).hexdigest()
    return f"node:{int(info.node_id)}"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_identities(run_dir: Path) -> dict[str, Any]:
    """The run dir's bindings, releases and attestations (common/site_chain.py checks
    them); empty ones before any site was bound. Raises FedsynthError naming the file."""
    return read_identities_file(run_dir / SITE_IDENTITIES)


def _read_guarded(run_dir: Path) -> dict[str, Any]:
    """read_identities, refusing a missing file while the ledger charges identities: it
    would hand every name to whoever claims it first."""
    data = read_identities(run_dir)
    path = run_dir / SITE_IDENTITIES
    if not path.exists() and any(e.get("identity") for e in read_ledger(run_dir / LEDGER)):
        raise FedsynthError(
            f"{path} is missing while {run_dir / LEDGER} charges sites to identities: restore "
            "it from a backup (without it any node could take any site's name); nothing was "
            "bound"
        )
    return data


def _write(run_dir: Path, data: dict[str, Any]) -> None:
    atomic_write_text(run_dir / SITE_IDENTITIES, json.dumps(data, indent=1) + "\n")


def _release(data: dict[str, Any], site: str, by: str, reason: str) -> dict[str, Any]:
    binding = data["bindings"].pop(site)
    released = {
        "site": site,
        "identity": binding["identity"],
        "released": _now(),
        "by": by,
        "reason": reason,
    }
    data["released"].append(released)
    return released


def _attest(data: dict[str, Any], site: str, old: str, new: str, by: str, reason: str) -> None:
    edge = {"site": site, "from": old, "to": new, "by": by, "at": _now(), "reason": reason}
    data["same_site"].append(edge)


def _attested_from(data: dict[str, Any], site: str, bound: str, new: str, named: str | None) -> str:
    """The identity `new` is attested to succeed at `site`: `named` (the operator's --from),
    which must have held the name; without it the one candidate: the identity bound now
    (when it is not `new`) or released from the name and not yet attested to any successor.
    Never picked among several (one of them may be another node that took the name after a
    plain unbind, whose estimates the site's reports must not settle). Raises FedsynthError."""
    released = [r["identity"] for r in data["released"] if r["site"] == site]
    held = {*released, bound} - {new}
    if named is not None:
        if not is_identity(named) or named not in held:
            raise FedsynthError(
                f"--from {named!r}: not an identity that held {site} other than {new} "
                f"(held: {', '.join(sorted(held)) or 'none'})"
            )
        return named
    attested = {e["from"] for e in data["same_site"] if e["site"] == site}
    candidates = sorted(({*released} - attested | {bound}) - {new})
    if not held:
        raise FedsynthError(f"{site}: no identity other than {new} held it: nothing to attest")
    if len(candidates) != 1:
        why = ", ".join(candidates) or "none"
        raise FedsynthError(
            f"{site}: --same-site needs --from OLD, the identity {new} succeeds (identities "
            f"that held the name and were not attested to a successor: {why})"
        )
    return candidates[0]


def unbind(
    run_dir: Path,
    site: str,
    reason: str,
    same_site: str | None = None,
    same_from: str | None = None,
) -> dict[str, Any]:
    """The operator's step: release `site`'s binding so that the next identity to claim it
    at READY is bound to it (a running study sees it at its next READY); the estimates
    charged to the old identity stay charged. With `same_site` (an identity) the operator
    attests that it is the same site as `same_from` (an identity that held the name): the
    name passes to `same_site` at once, and its reports may replace `same_from`'s
    estimates (lines it reported beside them already are settled,
    server/privacy_ledger.py). Without `same_from` the old identity is the one candidate
    (_attested_from); with several (another node took the name after a plain unbind) the
    attestation is refused, never guessed. Returns the release record (or the
    attestation); raises FedsynthError when the run dir binds no such site, `same_site`
    is not an identity or speaks for another name, or the old identity is not clear."""
    from fedsynth.server.privacy_ledger import settle_attested  # it reads this module

    with ledger_lock(run_dir / SITE_IDENTITIES):
        data = _read_guarded(run_dir)
        bound = data["bindings"].get(site, {}).get("identity")
        if bound is None:
            names = ", ".join(sorted(data["bindings"])) or "none"
            raise FedsynthError(f"{run_dir}: no binding for site {site!r} (bound: {names})")
        if same_site is None:
            if same_from is not None:
                raise FedsynthError("--from names the identity --same-site succeeds: give both")
            record = _release(data, site, "operator", reason)
            _write(run_dir, data)
            log.warning(
                "%s unbound from %s in %s by the operator (%s): the next node to claim it "
                "at READY is bound to it; what the old identity was charged stays",
                site,
                record["identity"],
                run_dir,
                reason,
            )
            return record
        if not is_identity(same_site):
            raise FedsynthError(f"--same-site {same_site!r}: not an identity (key:<64 hex>)")
        other = next((s for s, b in data["bindings"].items() if b["identity"] == same_site), None)
        if other is not None and other != site:
            raise FedsynthError(f"{run_dir}: {same_site} speaks for {other} already")
        old = _attested_from(data, site, bound, same_site, same_from)
        if bound != same_site:
            _release(data, site, "operator", reason)
            data["bindings"][site] = {
                "identity": same_site,
                "run": None,
                "node": None,
                "bound": _now(),
                "simulated": False,
            }
        _attest(data, site, old, same_site, "operator", reason)
        _write(run_dir, data)
        settled = settle_attested(run_dir, site)
    log.warning(
        "%s: the operator attests that %s is the same site as %s in %s (%s): its reports "
        "may replace what %s was charged as estimates (%d settled now)",
        site,
        same_site,
        old,
        run_dir,
        reason,
        old,
        settled,
    )
    return data["same_site"][-1]


class SiteNames:
    """node id -> site name for this Flower run, from claims checked against the run
    dir's bindings (see the module docstring)."""

    def __init__(self, run_dir: Path, simulated: bool) -> None:
        """`simulated`: a `flwr run` simulation, whose bindings last one Flower run."""
        self.run_dir = run_dir
        self.simulated = simulated
        self._site_of: dict[int, str] = {}
        self._identity_of: dict[int, str] = {}

    def claim(self, round_number: int, claims: list[Claim], run_id: int) -> set[int]:
        """Check this READY's claims against the bindings, bind unheld names to their one
        claimant and write the bindings (before any ledger line of this READY); returns
        the nodes whose claim holds. Every refused claim is logged in one warning line."""
        with ledger_lock(self.run_dir / SITE_IDENTITIES):
            data = _read_guarded(self.run_dir)
            changed = self._release_earlier_runs(data, run_id)
            bindings: dict[str, dict[str, Any]] = data["bindings"]
            claimants: dict[str, set[str]] = defaultdict(set)
            for _, identity, site in claims:
                claimants[site].add(identity)
            speaks_for = {b["identity"]: s for s, b in bindings.items()}
            accepted = set()
            for node, identity, site in claims:
                holder = bindings.get(site, {}).get("identity")
                other = speaks_for.get(identity)
                if holder is None and other is None and len(claimants[site]) == 1:
                    bindings[site] = {
                        "identity": identity,
                        "run": run_id,
                        "node": node,
                        "bound": _now(),
                        "simulated": self.simulated,
                    }
                    speaks_for[identity] = site
                    changed = True
                    log.info("%s bound to %s (node %d)", site, identity, node)
                    self._attest_rebind(data, site, identity, run_id)
                elif holder != identity:
                    self._refuse(round_number, node, identity, site, holder, other)
                    continue
                accepted.add(node)
                self._site_of[node] = site
                self._identity_of[node] = identity
            if changed:
                _write(self.run_dir, data)
        for node in {n for n, _, _ in claims} - accepted:
            self._site_of.pop(node, None)
            self._identity_of.pop(node, None)
        return accepted

    def _release_earlier_runs(self, data: dict[str, Any], run_id: int) -> bool:
        """In a simulated run, the bindings another simulated Flower run made: released,
        logged, recorded. A real run's binding stays, whatever this run's config says."""
        if not self.simulated:
            return False
        stale = [
            s
            for s, b in data["bindings"].items()
            if b.get("simulated", False) and b.get("run") != run_id
        ]
        for site in stale:
            reason = f"simulated study resumed in Flower run {run_id}: new node ids and keys"
            released = _release(data, site, "simulation", reason)
            log.info("%s unbound from %s: %s", site, released["identity"], reason)
        return bool(stale)

    def _attest_rebind(self, data: dict[str, Any], site: str, identity: str, run_id: int) -> None:
        """A simulated run binding a name its simulation released: the same phantom site
        (same state folder, no outside node can join), so attested like the operator's."""
        released = [r for r in data["released"] if r["site"] == site]
        if (
            self.simulated
            and released
            and released[-1]["by"] == "simulation"
            and released[-1]["identity"] != identity
        ):
            reason = f"the same simulated site in Flower run {run_id}"
            _attest(data, site, released[-1]["identity"], identity, "simulation", reason)

    def _refuse(
        self,
        round_number: int,
        node: int,
        identity: str,
        site: str,
        holder: str | None,
        other: str | None,
    ) -> None:
        if other is not None and other != site:
            why = f"its identity {identity} speaks for {other}"
        elif holder is not None:
            why = (
                f"the name is bound to {holder} (`fedsynth unbind-site` releases it; "
                "--same-site IDENTITY when the node is the same site under a new key)"
            )
        else:
            why = "another identity claims it in the same READY; neither is bound"
        log.warning(
            "round %d: node %d claims %s and is refused (not picked, its history not "
            "reconciled): %s; the node's identity is %s",
            round_number,
            node,
            site,
            why,
            identity,
        )

    def get(self, node: int) -> str | None:
        """The site `node` speaks for, or None before a claim of it held."""
        return self._site_of.get(node)

    def __getitem__(self, node: int) -> str:
        return self._site_of[node]

    def identity(self, node: int) -> str:
        """The identity `node`'s claim held with (what its ledger lines are charged to)."""
        return self._identity_of[node]

    def describe(self, node: int) -> str:
        """The site's name for a log line, or `node N` while none is bound."""
        return self._site_of.get(node, f"node {node}")
