"""Progress lines in a log (stderr not a terminal): one per interval, each with its count."""

import functools
import io
import time

from tqdm import tqdm

from fedsynth.common import progress as progress_module


def test_a_slow_loop_logs_no_stale_repeated_line(monkeypatch):
    """tqdm's monitor thread refreshes a bar not printed for `maxinterval`; with a dynamic
    item count it re-printed the last line with its old count (seen in a ServerApp's log:
    'latent unet: 124/1000 [01:00...' then '124/1000 [01:16...'). Scaled down here: a line
    every 0.6 s, the monitor checking every 0.05 s for bars older than 0.2 s."""
    stderr = io.StringIO()
    monkeypatch.setattr(progress_module.sys, "stderr", stderr)
    monkeypatch.setattr(progress_module, "LOG_INTERVAL_S", 0.6)
    monkeypatch.setattr(tqdm, "monitor_interval", 0.05)
    monkeypatch.setattr(
        progress_module, "tqdm", functools.partial(tqdm, maxinterval=0.2, file=stderr)
    )
    for _ in progress_module.progress(range(60), "slow"):
        time.sleep(0.04)
    lines = [line.strip() for line in stderr.getvalue().splitlines() if line.strip()]
    counts = [line.split()[1] for line in lines]
    assert len(lines) >= 3, lines  # the interval really passed several times
    assert len(counts) == len(set(counts)), lines


def test_a_log_ends_with_a_completion_line(monkeypatch, caplog):
    """In a log, the last progress line may be a minute old: the work ends with a line that
    says it is done and how many items it took; a loop left early says nothing of the sort."""
    stderr = io.StringIO()
    monkeypatch.setattr(progress_module.sys, "stderr", stderr)
    monkeypatch.setattr(progress_module, "tqdm", functools.partial(tqdm, file=stderr))
    assert list(progress_module.progress(range(7), "encode site")) == list(range(7))
    assert "encode site: done, 7 in 0 s" in caplog.messages
    # the bar's own lines are whole: no carriage returns, no line of blanks when it closes
    assert stderr.getvalue().splitlines()[0] == "encode site: 0/7 [00:00<?]"
    assert "\r" not in stderr.getvalue()
    assert all(line.strip() for line in stderr.getvalue().splitlines())
    caplog.clear()
    for item in progress_module.progress(range(7), "stopped"):
        if item == 2:
            break
    assert not [m for m in caplog.messages if "done" in m]
