"""`fedsynth bench` prints measured ratios as JSON and refuses unknown keys in one line."""

from __future__ import annotations

import json
import subprocess
import sys

CLI = [sys.executable, "-m", "fedsynth.common.cli", "bench"]


def bench_tiny(key: str) -> float:
    """One key measured by the CLI on the tiny preset."""
    proc = subprocess.run(
        [*CLI, "--config", "tiny", "--only", key, "--json"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)[key]


def test_ddim_speedup_is_measured_and_plausible():
    ratio = bench_tiny("ddim_speedup_over_ddpm")
    # tiny: 100 DDPM steps against 5 DDIM steps, the same network: about 20x less work; only
    # a loose bound, since a busy machine skews the short DDIM run
    assert ratio > 2


def test_dp_step_ratio_and_site_memory_are_measured():
    # per-sample gradients, clipping and noise on top of the same forward and backward
    assert bench_tiny("dp_step_over_nonprivate") > 1.0
    # a fresh process holding torch, MONAI, Opacus and a tiny UNet: hundreds of MiB, not GiB
    assert 100 < bench_tiny("site_peak_memory_mb") < 4000


def test_unknown_key_is_one_line():
    proc = subprocess.run([*CLI, "--only", "nope", "--json"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "fedsynth bench: error: unknown bench key 'nope' (known: ddim_speedup_over_ddpm, "
        "dp_step_over_nonprivate, site_peak_memory_mb)"
    )
