"""Privacy ledgers: append-only JSONL, each line fsync'd before the caller goes on.

Both the site (before an update leaves it) and the server (before a round's model is
saved) keep one. A line is one JSON object with at least `round`, `site`,
`noise_multiplier`, `sample_rate`, `steps` (this round's), `delta`, `epsilon` (the site's
total after this round) and `status` (`trained`, `refused` or `no-reply`), so anyone can
recompute the spend. A crash can only tear the last line, which was never acknowledged:
readers skip it and the next append cuts it off; any other bad line is an error, because
silently dropping spend would understate epsilon.

Several processes may share a ledger (two studies' ClientApps on one SuperNode share the
site's state dir). Each append holds an exclusive flock on the ledger file while it cuts a
torn line and writes its own, so it can never cut a line another process is writing; a
read-plan-append sequence holds `ledger_lock` throughout, so that no other process plans
against the same spend in between.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from fedsynth.common.accountant import Segment
from fedsynth.common.errors import FedsynthError
from fedsynth.common.io import PRIVATE_MODE, folder_mode, fsync_dir

STATUSES = ("trained", "refused", "no-reply")
REQUIRED = ("round", "site", "noise_multiplier", "sample_rate", "steps", "delta", "epsilon")


def _complete_length(data: bytes) -> int:
    """Length of the part of the file made of whole (newline-ended) lines."""
    return data.rfind(b"\n") + 1


def read_ledger(path: str | os.PathLike) -> list[dict]:
    """Every complete entry, oldest first; [] when the ledger does not exist yet."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    entries = []
    for number, line in enumerate(data[: _complete_length(data)].splitlines(), 1):
        try:
            entry = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise FedsynthError(f"{path}, line {number}: not a JSON ledger entry") from None
        _check_entry(entry, f"{path}, line {number}")
        entries.append(entry)
    return entries


def append_entry(path: str | os.PathLike, entry: dict) -> None:
    """Append one entry and fsync it; returns only once it is on disk.

    A new ledger is created owner-only (0600; a new folder 0700): it names every round
    a site trained.
    """
    _check_entry(entry, f"new entry for {path}")
    path = Path(path)
    path.parent.mkdir(mode=folder_mode(PRIVATE_MODE), parents=True, exist_ok=True)
    created = not path.exists()
    line = (json.dumps(entry, sort_keys=True) + "\n").encode()
    with open(os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, PRIVATE_MODE), "rb+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released on close; a torn line is then a crash's
        f.seek(0)
        keep = _complete_length(f.read())
        f.truncate(keep)  # drop a torn last line left by a crash mid-write
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    if created:
        fsync_dir(path.parent)


@contextlib.contextmanager
def ledger_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ledger `path` until the block ends (blocks while another
    process holds it).

    The lock is a flock on `<path>.lock` beside the ledger (created 0600), not on the
    ledger, so appends inside the block do not wait on it. Every process that plans from a
    ledger and then appends to it must hold it from the read to the append.
    """
    path = Path(path)
    path.parent.mkdir(mode=folder_mode(PRIVATE_MODE), parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, PRIVATE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _check_entry(entry: object, where: str) -> None:
    if not isinstance(entry, dict):
        raise FedsynthError(f"{where}: a ledger entry must be a JSON object")
    missing = [key for key in REQUIRED if key not in entry]
    if missing:
        raise FedsynthError(f"{where}: ledger entry lacks {', '.join(missing)}")
    if entry.get("status") not in STATUSES:
        raise FedsynthError(
            f"{where}: ledger status {entry.get('status')!r} is not one of {', '.join(STATUSES)}"
        )


def spending(entries: Iterable[dict], site: str | None = None) -> list[dict]:
    """The entries that count toward epsilon: trained rounds and no-reply charges."""
    return [
        e
        for e in entries
        if e["status"] != "refused" and int(e["steps"]) > 0 and site in (None, e["site"])
    ]


def segment_of(entry: dict) -> Segment:
    """The (sigma, rate, steps) of one ledger entry (or a site's reply metrics)."""
    sigma, rate = float(entry["noise_multiplier"]), float(entry["sample_rate"])
    return Segment(sigma, rate, int(entry["steps"]))


def spent_segments(entries: Iterable[dict], site: str | None = None) -> list[Segment]:
    """The (sigma, rate, steps) history that counts: trained rounds and no-reply charges."""
    return [segment_of(e) for e in spending(entries, site)]


def charged(entries: Iterable[dict], site: str) -> list[dict]:
    """The lines that count toward `site`'s epsilon in a server ledger: spending lines,
    less each no-reply estimate that a line of the site's own report has since replaced
    (its `replaces_estimate` names the estimate's id). A site's own ledger has no
    estimates, so there it is `spending`."""
    mine = [e for e in entries if e["site"] == site]
    replaced = {str(e["replaces_estimate"]) for e in mine if e.get("replaces_estimate")}
    return [e for e in spending(mine, site) if str(e.get("estimate") or "") not in replaced]
