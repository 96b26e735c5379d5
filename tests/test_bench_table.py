"""docs/benchmarks.md is what simulations/bench_table.py writes from docs/bench/*.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from fedsynth.simulations import bench_table

ROOT = Path(__file__).resolve().parents[1]
RUNS = sorted((ROOT / "docs" / "bench").glob("*.json"))


def test_the_checked_in_page_is_what_the_generator_writes():
    """Regenerate with bench_table.COMMAND after adding or changing a bench JSON file."""
    assert RUNS, "no bench runs in docs/bench"
    proc = subprocess.run(
        [sys.executable, "-m", "fedsynth.simulations.bench_table", *map(str, RUNS)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert (ROOT / "docs" / "benchmarks.md").read_text() == proc.stdout, (
        f"docs/benchmarks.md is stale: run `{bench_table.COMMAND}`"
    )


def test_every_bench_key_says_what_it_measures():
    from fedsynth.simulations.bench import MEASURES

    assert list(bench_table.MEANINGS) == list(MEASURES)
    assert all(line and "\n" not in line for line in bench_table.MEANINGS.values())


def test_the_old_single_value_form_is_read_with_its_remeasured_keys():
    old = bench_table.load(ROOT / "docs" / "bench" / "2026-12-01.json")
    assert old.date == "2026-12-01" and old.hardware == {}
    assert old.entries["dp_step_over_nonprivate"] == bench_table.Entry(0.838)
    memory = old.entries["site_peak_memory_mb"]  # measured again after the ru_maxrss fix
    assert memory.median == 1011.246 and memory.again and memory.repeats is None
    assert bench_table.spread(memory) == "—"
    assert any("ru_maxrss" in note for note in old.notes)


def _run(tmp_path: Path, name: str, date: str, results: dict) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({"command": "fedsynth bench --json", "date": date, **results}))
    return path


def test_the_latest_run_of_a_key_gives_its_row_with_spread_repeats_and_hardware(tmp_path):
    figure = {
        "median": 1.05,
        "repeats": 9,
        "q1": 1.0,
        "q3": 1.1,
        "min": 0.9,
        "max": 1.3,
        "samples": [1.05] * 9,
        "method": "interleaved pairs",
    }
    new = {
        "machine": "busy",
        "results": {
            "dp_step_over_nonprivate": 1.05,
            "figures": {"dp_step_over_nonprivate": figure},
            "hardware": {"cpu": "Some CPU", "cores": 2, "torch": "2.x", "torch_threads": 1},
            "settings": {"config": "default", "site_subjects": 300, "repeats": None},
            "date": "2026-12-06",
            "wall_seconds": 60,
        },
    }
    old = {"results": {"dp_step_over_nonprivate": 0.838, "round_bytes": 407496.0}}
    page = bench_table.render(
        [
            bench_table.load(_run(tmp_path, "b.json", "2026-12-06", new)),
            bench_table.load(_run(tmp_path, "a.json", "2026-12-01", old)),
        ]
    )
    table = page.split("## Runs", 1)[0]
    rows = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| `")}
    step = rows["| `dp_step_over_nonprivate`"]
    assert step.endswith(
        "| 1.05 | IQR 1 to 1.1, range 0.9 to 1.3 | 9 | [b.json](bench/b.json) (2026-12-06) |"
    )
    assert "| 407,496 | — | — | [a.json](bench/a.json) (2026-12-01) |" in rows["| `round_bytes`"]
    assert "Some CPU, 2 cores" in page and "torch 2.x on 1 thread(s)" in page
    assert "config default, site_subjects 300" in page  # repeats None: left out
    assert "- `dp_step_over_nonprivate`: interleaved pairs" in page
    earlier = page.split("## Earlier figures", 1)[1]
    assert "| `dp_step_over_nonprivate` | 0.838 | — | — | [a.json](bench/a.json)" in earlier


def test_a_file_that_is_not_bench_json_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert bench_table.main([str(bad)]) == 1
    assert capsys.readouterr().err.startswith(f"bench_table: error: {bad}: not a bench JSON")
