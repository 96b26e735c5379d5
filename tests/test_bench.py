"""`fedsynth bench` prints measured ratios as JSON and refuses unknown keys in one line."""

from __future__ import annotations

import json
import subprocess
import sys

CLI = [sys.executable, "-m", "fedsynth.common.cli", "bench"]


def test_ddim_speedup_is_measured_and_plausible():
    proc = subprocess.run(
        [*CLI, "--config", "tiny", "--only", "ddim_speedup_over_ddpm", "--json"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    ratio = json.loads(proc.stdout)["ddim_speedup_over_ddpm"]
    # tiny: 100 DDPM steps against 5 DDIM steps, the same network: about 20x less work; only
    # a loose bound, since a busy machine skews the short DDIM run
    assert ratio > 2


def test_unknown_key_is_one_line():
    proc = subprocess.run([*CLI, "--only", "nope", "--json"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "fedsynth bench: error: unknown bench key 'nope' (known: ddim_speedup_over_ddpm)"
    )
