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
  simulation has no Fleet API). A simulated study (run config `data="phantoms"`) therefore
  binds its names for one Flower run: bindings made in an earlier run are released when a
  new run first asks READY, and the release is logged and recorded like the operator's.

Claims at a READY: the bound identity keeps its name; any other identity claiming it is
refused (one warning line; the node is not picked, its history is not reconciled, nothing
is written for it), as is an identity that already speaks for another name. A name no
one holds yet goes to its claimant, unless two identities claim it in the same READY: then
neither gets it (the operator must take one off). The binding is written (atomically,
under a lock the CLI shares) before the READY writes any ledger line for that site.

run-dir/site-identities.json:
  {"bindings": {site: {"identity", "run" (Flower run id), "node", "bound" (UTC)}},
   "released": [{"site", "identity", "released" (UTC), "by" ("operator"|"simulation"),
                 "reason"}, ...]}
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
from fedsynth.common.ledger import ledger_lock

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
    """The run dir's bindings and releases; empty ones before any site was bound. Raises
    FedsynthError naming the file when it is not what this module writes."""
    path = run_dir / SITE_IDENTITIES
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {"bindings": {}, "released": []}
    except (OSError, ValueError):
        raise FedsynthError(f"{path}: not a readable site identities file") from None
    if not (
        isinstance(data, dict)
        and isinstance(data.get("bindings"), dict)
        and isinstance(data.get("released"), list)
        and all(isinstance(b, dict) and "identity" in b for b in data["bindings"].values())
    ):
        raise FedsynthError(f"{path}: not a site identities file (bindings, released)")
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


def unbind(run_dir: Path, site: str, reason: str) -> dict[str, Any]:
    """The operator's step: release `site`'s binding so that the next identity to claim it
    at READY is bound to it (a running study sees it at its next READY). The estimates
    charged to the old identity stay charged. Returns the release record; raises
    FedsynthError when the run dir binds no such site."""
    with ledger_lock(run_dir / SITE_IDENTITIES):
        data = read_identities(run_dir)
        if site not in data["bindings"]:
            bound = ", ".join(sorted(data["bindings"])) or "none"
            raise FedsynthError(f"{run_dir}: no binding for site {site!r} (bound: {bound})")
        released = _release(data, site, "operator", reason)
        _write(run_dir, data)
    log.warning(
        "%s unbound from %s in %s by the operator (%s): the next node to claim it at READY "
        "is bound to it; what the old identity was charged stays",
        site,
        released["identity"],
        run_dir,
        reason,
    )
    return released


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
            data = read_identities(self.run_dir)
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
                    }
                    speaks_for[identity] = site
                    changed = True
                    log.info("%s bound to %s (node %d)", site, identity, node)
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
        """A simulation's bindings made in another Flower run: released, logged, recorded."""
        if not self.simulated:
            return False
        stale = [s for s, b in data["bindings"].items() if b.get("run") != run_id]
        for site in stale:
            reason = f"simulated study resumed in Flower run {run_id}: new node ids and keys"
            released = _release(data, site, "simulation", reason)
            log.info("%s unbound from %s: %s", site, released["identity"], reason)
        return bool(stale)

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
            why = f"the name is bound to {holder} (`fedsynth unbind-site` releases it)"
        else:
            why = "another identity claims it in the same READY; neither is bound"
        log.warning(
            "round %d: node %d claims %s and is refused (not picked, its history not "
            "reconciled): %s",
            round_number,
            node,
            site,
            why,
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
