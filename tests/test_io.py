"""File writes: private unless asked otherwise, no umask games, on disk before they return."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest

from fedsynth.common.io import (
    PUBLIC_MODE,
    atomic_path,
    atomic_write_text,
    private_dir,
    published_path,
)
from fedsynth.common.ledger import append_entry

ENTRY = {
    "round": 1,
    "site": "site-1",
    "noise_multiplier": 1.1,
    "sample_rate": 0.2,
    "steps": 10,
    "delta": 1e-5,
    "epsilon": 2.0,
    "status": "trained",
}


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def process_umask() -> int:
    """The umask, read without setting it (Linux /proc)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        pytest.skip("no /proc/self/status to read the umask from")
    return int(
        next(line for line in status.splitlines() if line.startswith("Umask:")).split()[1], 8
    )


@pytest.fixture(autouse=True)
def no_umask_calls(monkeypatch):
    """os.umask is process-wide (a race with other threads): nothing may call it."""

    def refuse(*_):
        raise AssertionError("os.umask called")

    monkeypatch.setattr(os, "umask", refuse)


def test_atomic_writes_are_private_by_default_and_public_only_when_asked(tmp_path):
    umask = process_umask()
    private = tmp_path / "new" / "latents.pt"
    atomic_write_text(private, "x")
    assert mode(private) == 0o600 & ~umask and mode(private.parent) == 0o700 & ~umask

    public = tmp_path / "out" / "cohort" / "syn-0001.nii.gz"
    with atomic_path(public, mode=PUBLIC_MODE) as tmp:
        assert tmp.name.endswith(".nii.gz")  # writers that pick a format by name still can
        tmp.write_bytes(b"volume")
    assert mode(public) == 0o644 & ~umask and mode(public.parent) == 0o755 & ~umask
    assert public.read_bytes() == b"volume"

    # replacing a file gives it the writer's mode, not the old file's
    os.chmod(public, 0o666)
    atomic_write_text(public, "again")
    assert mode(public) == 0o600
    assert [p.name for p in public.parent.iterdir()] == [public.name]  # no temporary left


def test_a_new_ledger_is_owner_only(tmp_path):
    ledger = tmp_path / "state" / "ledger.jsonl"
    append_entry(ledger, ENTRY)
    assert mode(ledger) == 0o600 and mode(ledger.parent) == 0o700
    append_entry(ledger, ENTRY | {"round": 2})
    assert mode(ledger) == 0o600


def test_private_dir_creates_or_tightens_an_open_folder(tmp_path, caplog):
    created = private_dir(tmp_path / "a" / "state")
    assert mode(created) == 0o700

    opened = tmp_path / "opened"
    opened.mkdir()
    os.chmod(opened, 0o755)
    with caplog.at_level(logging.WARNING, logger="fedsynth.common.io"):
        private_dir(opened)
    assert mode(opened) == 0o700
    assert "was open to other users (mode 755): now 700" in caplog.text


class FsyncLog:
    """Records, at each os.fsync, what the descriptor is and what the file holds then."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[tuple[str, int, object]] = []
        real = os.fsync

        def fsync(fd: int) -> None:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                names = sorted(os.listdir(f"/proc/self/fd/{fd}"))
                self.calls.append(("dir", info.st_ino, names))
            else:
                self.calls.append(("file", info.st_ino, Path(f"/proc/self/fd/{fd}").read_bytes()))
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)


def test_append_entry_fsyncs_the_line_and_a_new_folder_entry_before_returning(
    tmp_path, monkeypatch
):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("no /proc/self/fd to read a descriptor's content")
    log = FsyncLog(monkeypatch)
    ledger = tmp_path / "ledger.jsonl"
    append_entry(ledger, ENTRY)
    content = ledger.read_bytes()
    # the file, holding the whole new line, then the folder that now names it
    folder = ("dir", tmp_path.stat().st_ino, [ledger.name])
    assert log.calls == [("file", ledger.stat().st_ino, content), folder]

    log.calls.clear()
    append_entry(ledger, ENTRY | {"round": 2})
    assert [json.loads(line)["round"] for line in ledger.read_bytes().splitlines()] == [1, 2]
    assert log.calls == [("file", ledger.stat().st_ino, ledger.read_bytes())]  # no new name


def test_atomic_write_fsyncs_the_content_then_the_rename(tmp_path, monkeypatch):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("no /proc/self/fd to read a descriptor's content")
    log = FsyncLog(monkeypatch)
    target = tmp_path / "summary.json"
    atomic_write_text(target, "final")
    [(kind, _, content), folder] = log.calls
    assert (kind, content) == ("file", b"final")  # the temporary, complete, before the rename
    assert folder == ("dir", tmp_path.stat().st_ino, [target.name])  # after it
    assert target.read_text() == "final"


def test_a_published_path_is_relative_beside_its_folder_and_a_stand_in_elsewhere(tmp_path):
    release = tmp_path / "study" / "release"
    beside = tmp_path / "study" / "run-1"
    assert published_path(beside, release, "RUNS") == "../run-1"
    assert (release / published_path(beside, release, "RUNS")).resolve() == beside.resolve()
    assert published_path(release / "data", release, "DATA") == "data"
    # deeper beside the release would show the folders' layout; elsewhere, the home
    for elsewhere in (tmp_path / "study" / "runs" / "run-1", tmp_path / "home" / "run-1"):
        assert published_path(elsewhere, release, "RUNS") == "RUNS/run-1"
