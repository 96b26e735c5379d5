"""`fedsynth unbind-site`: the operator's step that lets another identity take a site's name.

A site's name is bound to the identity that first claimed it at READY
(server/site_identity.py) and the study refuses every other identity under that name.
When a site really changed its key (a new node key, a SuperNode without node
authentication restarted), the operator releases the binding here; the release is logged
and recorded in the run dir's site-identities.json, and the next identity to claim the
name at READY (in a running study, at its next round) is bound to it. What the old
identity was charged stays charged, and its no-reply estimates stay: a plain unbind says
nothing about who the new identity is.

`--same-site IDENTITY` attests that IDENTITY (the refused node's, from the study's log
line) is the same site under a new key: the name passes to it at once, the attestation
is recorded old -> new, and its reports may replace the old identity's estimates (lines
it already reported beside them are settled now). `--from OLD` names the identity it
succeeds (one that held the name); it may be left out only when one identity could be
meant (the one bound now, or the one released since the name's last attestation): after
two plain unbinds another node may have held the name in between, and its estimates are
not the site's to settle, so the tool refuses rather than pick.
"""

from __future__ import annotations

import argparse

HELP = (
    "Release a site's name from the identity it is bound to in a study's run dir, so that "
    "the next node to claim it is bound instead (logged and recorded in the run dir)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, metavar="DIR", help="the study's run dir")
    parser.add_argument("--site", required=True, metavar="NAME", help="the site's name")
    parser.add_argument(
        "--reason",
        required=True,
        metavar="TEXT",
        help="why (recorded), e.g. 'site-2 rotated its node key'",
    )
    parser.add_argument(
        "--same-site",
        metavar="IDENTITY",
        help="attest that this identity (key:<sha256>, as the study logs it) is the same "
        "site: the name passes to it and its reports may replace the old identity's estimates",
    )
    parser.add_argument(
        "--from",
        dest="same_from",
        metavar="OLD",
        help="with --same-site: the identity that held the name which IDENTITY succeeds "
        "(needed when more than one could be meant)",
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedsynth.common.errors import FedsynthError
    from fedsynth.server.site_identity import unbind

    run_dir = Path(args.run).expanduser().resolve()
    if not run_dir.is_dir():
        raise FedsynthError(f"{run_dir}: no such run dir")
    unbind(
        run_dir, args.site, args.reason, args.same_site, args.same_from
    )  # logs the operator's line
    return 0
