"""The package installs as one namespace, the CLI answers --help, and README and CI agree."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fedsynth.common.cli import COMMANDS
from fedsynth.simulations.local_flwr import QUICK_START_FEDERATION

ROOT = Path(__file__).resolve().parents[1]


def test_only_the_fedsynth_namespace_is_importable():
    for part in ("common", "client", "server", "simulations"):
        assert importlib.util.find_spec(f"fedsynth.{part}") is not None
        assert importlib.util.find_spec(part) is None, f"a top-level '{part}' is importable"


def test_common_imports_neither_client_server_nor_simulations():
    pattern = re.compile(r"^\s*(from|import)\s+fedsynth\.(client|server|simulations)\b", re.M)
    offenders = [p.name for p in (ROOT / "common").glob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_a_study_with_real_sites_never_imports_the_simulation(tmp_path, tiny_checkpoint):
    """One ServerApp for simulation and deployment: a coordinator's study with real sites
    (and a hospital's ClientApp) loads nothing from simulations/, which a phantom study
    imports when it needs it."""
    script = f"""
import sys
from fedsynth.client.client_app import app as client_app
from fedsynth.server.server_app import app, run_federation
from fedsynth.server.study import prepare
prepare({{"config": "tiny", "data": "sites", "checkpoint": {str(tiny_checkpoint)!r},
         "run-dir": {str(tmp_path / "run")!r}}})
print(sorted(m for m in sys.modules if m.startswith("fedsynth.simulations")))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'serverapp = "fedsynth.server.server_app:app"' in pyproject
    assert not (ROOT / "simulations" / "server_app.py").exists()
    # and nothing under server/ or client/ imports it at module level
    pattern = re.compile(r"^(from|import)\s+fedsynth\.simulations\b", re.M)
    offenders = [
        p.name
        for part in ("server", "client")
        for p in (ROOT / part).glob("*.py")
        if pattern.search(p.read_text())
    ]
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


def main_job_federation_config() -> str:
    """The --federation-config of the README's main job (the slow flwr run test uses it)."""
    main_job = quick_start_blocks()[0]
    return re.search(r'--federation-config "([^"]+)"', main_job).group(1)


def test_quick_start_installs_name_extras_the_package_declares():
    """The main job installs the simulation extra (Flower's simulation engine), the tests
    the simulation and dev extras; both exist in pyproject.toml, and the simulation engine
    is in the extra, not in what a hospital's site installs."""
    main_job, tests = quick_start_blocks()
    assert main_job.startswith("python3 -m venv .venv && .venv/bin/pip install ")
    assert tests == (
        "python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e '.[simulation,dev]'"
        " && .venv/bin/pytest"
    )
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert {"simulation", "dev"} <= set(extras)
    engine = ("flwr[simulation]", "ray")  # Flower's simulation engine, or Ray itself
    assert any(d.replace(" ", "").startswith(engine) for d in extras["simulation"])
    assert not any("[simulation]" in d for d in project["dependencies"])


def test_main_job_is_the_default_flwr_study_with_runtime_installs_off():
    main_job = quick_start_blocks()[0]
    install, run = main_job.split(" && . .venv/bin/activate && ")
    assert install == (
        "python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e '.[simulation]'"
    )
    assert run.startswith("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 flwr run . ")
    assert "num-supernodes=3" in main_job_federation_config()  # the default study's 3 sites
    # what `fedsynth bench` runs as the quick start (its real-`flwr run` overhead keys)
    assert main_job_federation_config() == QUICK_START_FEDERATION
    assert " -c " not in run  # no preparation or overrides: the default config


def readme_section(heading: str) -> str:
    return (ROOT / "README.md").read_text().split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_readme_command_table_lists_every_command():
    """Each command of the CLI (and `fedsynth study NAME`) has its row in README's table."""
    from fedsynth.simulations.studies import STUDIES

    rows = [line for line in readme_section("Commands").splitlines() if line.startswith("| `")]
    named = {re.match(r"\| `fedsynth ([^`]*)`", row).group(1).split()[0] for row in rows}
    assert set(COMMANDS) <= named
    study = next(row for row in rows if row.startswith("| `fedsynth study NAME`"))
    assert all(name in study for name in STUDIES)
    assert "| `fedsynth --version` |" in readme_section("Commands")


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def test_links_in_readme_and_docs_resolve():
    """Every relative link of README.md, the pages it points a reader to and deploy's
    runbook names a file or folder that exists (anchors aside)."""
    pages = [ROOT / "README.md", ROOT / "SECURITY.md", ROOT / "CHANGELOG.md"]
    pages += [*sorted((ROOT / "docs").glob("*.md")), ROOT / "deploy" / "README.md"]
    broken = []
    for page in pages:
        if not page.is_file():
            continue
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (page.parent / target.split("#", 1)[0]).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []


def test_generated_phantoms_pass_site_check_with_the_default_config(tmp_path):
    """Phantoms at small size: every generated row is usable, grouped by subject."""
    from fedsynth.common.config import load_config
    from fedsynth.simulations.phantoms import RANGES

    cli = [sys.executable, "-m", "fedsynth.common.cli"]
    out = tmp_path / "phantoms"
    args = ["phantoms", "--out", str(out), "--sites", "2", "--subjects", "3", "--quiet"]
    proc = subprocess.run([*cli, *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for folder, subjects in (("public", 6), ("site-1", 3), ("site-2", 3)):
        args = ["site-check", "--data-path", str(out / folder), "--json"]
        proc = subprocess.run([*cli, *args], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout)
        assert report["rejected"] == [] and report["warnings"] == []
        assert (report["usable"], report["subjects"]) == (2 * subjects, subjects)
    # the generator's ranges are the ones the default config declares
    declared = {a.name: (a.min, a.max) for a in load_config("default").data.attributes}
    assert declared == {k: (float(lo), float(hi)) for k, (lo, hi) in RANGES.items()}
