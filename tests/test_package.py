"""The package installs as one namespace, the CLI answers --help, and README and CI agree."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedsynth.common.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]


def test_only_the_fedsynth_namespace_is_importable():
    for part in ("common", "client", "server", "simulations"):
        assert importlib.util.find_spec(f"fedsynth.{part}") is not None
        assert importlib.util.find_spec(part) is None, f"a top-level '{part}' is importable"


def test_common_imports_neither_client_server_nor_simulations():
    pattern = re.compile(r"^\s*(from|import)\s+fedsynth\.(client|server|simulations)\b", re.M)
    offenders = [p.name for p in (ROOT / "common").glob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_command_has_help(command):
    args = [sys.executable, "-m", "fedsynth.common.cli", *([command] if command else []), "--help"]
    proc = subprocess.run(args, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "usage: fedsynth" in proc.stdout


def quick_start_blocks() -> list[str]:
    section = (ROOT / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, re.S)


def test_readme_quick_start_is_two_pinned_commands_and_ci_runs_the_second():
    main_job, tests = quick_start_blocks()
    for command in (main_job, tests):
        assert "\n" not in command.strip()
        assert "pip install torch==2.13.0 " in command
    install, test_command = tests.rsplit(" && ", 1)
    ci = (ROOT / ".ci" / "run").read_text()
    assert install in ci and f"\n{test_command}\n" in ci
    assert 'if [ "$rc" -eq 5 ]' in ci
