"""fedsynth's log: the console the apps and CLI show, and each site's private site.log."""

from __future__ import annotations

import logging
import shutil
import stat
import subprocess
import sys

import pytest

from fedsynth.client.site_log import LOG, at_site
from fedsynth.common import logs
from fedsynth.common.logs import ROOT, show_on_console


@pytest.fixture
def console():
    """The loggers as the apps set them, put back as they were afterwards."""
    logger = logging.getLogger(ROOT)
    handlers, level = list(logging.root.handlers), logger.level
    logging.root.handlers[:] = [h for h in handlers if not isinstance(h, logs._Console)]
    yield logger
    logging.root.handlers[:] = handlers
    logger.setLevel(level)


def test_the_console_shows_fedsynth_lines_once_with_warnings_marked(console, capsys):
    show_on_console()
    show_on_console()  # the ClientApp calls it for every message: still one handler
    log = logging.getLogger("fedsynth.server.strategy")
    log.info("round %d/%d: 3 trained", 1, 5)
    log.warning("site-2 reports epsilon %.3g", 7.5)
    logging.getLogger("fedsynth.server.readiness").debug("not shown at INFO")
    logging.getLogger("elsewhere").info("another library's INFO: not shown")
    logging.getLogger("elsewhere").warning("another library's warning")
    shown_by_its_own = logging.getLogger("own-console")
    shown_by_its_own.addHandler(logging.NullHandler())
    shown_by_its_own.warning("shown by its own handler, not again")
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "[fedsynth] round 1/5: 3 trained",
        "[fedsynth] warning: site-2 reports epsilon 7.5",
        "[elsewhere] warning: another library's warning",
    ]


def test_a_library_that_configures_logging_on_import_prints_nothing_twice():
    """Opacus calls logging.basicConfig when first imported (the ServerApp's accountant
    imports it mid-study): after the apps' console that adds nothing, and each line shows
    once (in its own process: pytest's handlers on the root would hide the case)."""
    script = """
import logging
from fedsynth.common.logs import show_on_console
show_on_console()
import opacus.utils.module_utils  # logging.basicConfig(...) at import
logging.getLogger("fedsynth.server.strategy").info("round 1/5: 3 trained")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["[fedsynth] round 1/5: 3 trained"]


def test_each_site_log_is_private_and_holds_only_its_own_records(tmp_path, caplog):
    """In a simulation several sites share a process: each site.log takes its own site's
    records only; a record without a state dir stays on the console."""
    first, second = tmp_path / "state-1", tmp_path / "state-2"
    log = logging.getLogger("fedsynth.client.client_app")
    log.warning("round %d: not ready (%s)", 1, "terms", extra=at_site(first))
    log.warning("data: /data/site-2/patient-7.nii.gz unreadable", extra=at_site(second))
    log.warning("the state dir is not known yet", extra=at_site(None))
    one, two = (first / LOG).read_text(), (second / LOG).read_text()
    assert "[fedsynth site] round 1: not ready (terms)" in one and "patient-7" not in one
    assert "patient-7" in two and "not ready" not in two
    assert "not known yet" not in one + two
    assert len(caplog.records) == 3  # all three reached the console's logger too
    for folder in (first, second):
        assert stat.S_IMODE((folder / LOG).stat().st_mode) == 0o600
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_a_site_log_removed_while_the_site_runs_is_made_again(tmp_path):
    state = tmp_path / "state"
    log = logging.getLogger("fedsynth.client.client_app")
    log.warning("round 1: not ready (terms)", extra=at_site(state))
    shutil.rmtree(state)  # an operator clears the state dir; the ClientApp process goes on
    log.warning("round 2: not ready (budget-spent)", extra=at_site(state))
    text = (state / LOG).read_text()
    assert "round 2: not ready" in text and "round 1" not in text
    assert stat.S_IMODE((state / LOG).stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


def test_a_level_the_host_set_stands(console, capsys):
    """A hospital that wants warnings only sets it once; the ClientApp's console, set up
    again for every message, does not lower it back to INFO."""
    console.setLevel(logging.WARNING)
    show_on_console()
    log = logging.getLogger("fedsynth.client.client_app")
    log.info("round 3: trained")
    log.warning("round 4: not ready (terms)")
    assert capsys.readouterr().err.splitlines() == [
        "[fedsynth] warning: round 4: not ready (terms)"
    ]


def test_an_unwritable_state_dir_loses_only_the_file_line(tmp_path, caplog):
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    log = logging.getLogger("fedsynth.client.site_terms")
    log.warning("terms: refused", extra=at_site(blocked / "state"))
    assert [r.getMessage() for r in caplog.records] == ["terms: refused"]
