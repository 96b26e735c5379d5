"""`fedsynth bench --device-report` (issue 15, item 5): absolute seconds and MiB of a site's
DP step and of sampling at the config's size and at the paper's 96x96x13, and the script
a site's GPU box runs it with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "fedsynth.common.cli", "bench"]
SITE = 6  # subjects per measured site: small, so the test stays fast


def test_paper_volume_is_96x96x13_with_a_4x_autoencoder():
    from fedsynth.common.config import load_config
    from fedsynth.common.models import latent_shape
    from fedsynth.simulations.device_report import paper_volume

    default = load_config("default")  # two autoencoder levels (2x): one is added
    paper = paper_volume(default)
    assert paper.data.shape == (96, 96, 13)
    assert list(paper.autoencoder.channels) == [16, 32, 64]
    assert latent_shape(paper) == (default.autoencoder.latent_channels, 24, 24, 13)
    assert paper.unet == default.unet and paper.privacy == default.privacy
    tiny = load_config("tiny")  # three levels already: kept
    assert list(paper_volume(tiny).autoencoder.channels) == list(tiny.autoencoder.channels)


def test_device_report_measures_both_sizes_on_this_device():
    proc = subprocess.run(
        [*CLI, "--config", "tiny", "--site-subjects", str(SITE), "--device-report", "--json"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    gpu = torch.cuda.is_available()
    assert report["device"] == (torch.cuda.get_device_name() if gpu else "cpu")
    assert report["torch"] == torch.__version__ and report["site_subjects"] == SITE
    own, paper = report["sizes"]
    assert (own["shape"], paper["shape"]) == ([32, 32, 8], [96, 96, 13])
    assert (own["latent"], paper["latent"]) == ([3, 8, 8, 8], [3, 24, 24, 13])
    for size in (own, paper):
        # tiny: 4 expected subjects a step (privacy.batch-size) at a 6-subject site
        assert size["subjects_per_step"] == 4 and size["trainable"] == "attention"
        assert size["dp_step_seconds"] > 0 and size["nonprivate_step_seconds"] > 0
        ratio = size["dp_step_seconds"] / size["nonprivate_step_seconds"]
        assert size["dp_over_nonprivate"] == pytest.approx(ratio, rel=0.01)
        # fresh processes holding torch, MONAI and Opacus: hundreds of MiB, not GiB
        assert 100 < size["site_peak_memory_mb"] < 4000
        assert 100 < size["sampling_peak_memory_mb"] < 4000
        assert size["sampling_seconds_per_volume"] > 0
        assert (size["sampling_batch_size"], size["sampling_steps"]) == (2, 5)
    assert "device report at 96x96x13" in proc.stderr


def test_device_report_with_only_is_one_line():
    proc = subprocess.run(
        [*CLI, "--device-report", "--only", "dp_step_over_nonprivate"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "leave out --only" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_gpu_check_refuses_in_one_line_without_a_gpu(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        ["bash", str(ROOT / "deploy" / "gpu-check.sh"), str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"gpu-check: {sys.executable}'s torch sees no CUDA GPU; run it on the GPU machine"
    )
    assert list(tmp_path.iterdir()) == []
