"""docs/benchmarks.md, generated from the bench's JSON files so the table cannot drift:

    python -m fedsynth.simulations.bench_table docs/bench/*.json > docs/benchmarks.md

A file in docs/bench/ is one bench run: `fedsynth bench --json`'s output under "results",
with the command, date, commit and a line on the machine beside it. Two forms are read:
the old one, whose "results" hold one value per key (docs/bench/2026-12-01.json, which
also holds keys measured again after a fix, in a section with "why" and "results"), and
the current one, whose "results" also hold "figures" (per key the median, its quartiles,
min and max, the repeats and how it was measured) and "hardware". A bare bench output
(no "results" around it) is read too. The latest file (by date) that holds a key gives
its row; earlier figures of a key are listed below the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from fedsynth.common.errors import FedsynthError

COMMAND = "python -m fedsynth.simulations.bench_table docs/bench/*.json > docs/benchmarks.md"

MEANINGS: dict[str, str] = {  # what each bench key measures, in one line
    "ddim_speedup_over_ddpm": "seconds of one guided, decoded volume by full DDPM (every "
    "training timestep) over DDIM (sampling.steps)",
    "dp_step_over_nonprivate": "seconds of one DP-SGD step over one plain step, same batch "
    "(a site's expected batch), the config's trainable subset",
    "dp_step_over_nonprivate_attention": "dp_step_over_nonprivate training the attention "
    "blocks and tokens (hooks)",
    "dp_step_over_nonprivate_whole_unet": "dp_step_over_nonprivate training every UNet "
    "weight (functorch)",
    "round_overhead_plain": "fraction of an in-process round's wall time not in local "
    "DP-SGD, plain FedAvg, 3 sites",
    "round_overhead_secagg": "round_overhead_plain with SecAgg+ (the trainable subset travels)",
    "round_overhead_secagg_whole_unet": "round_overhead_secagg when every UNet tensor "
    "travels and is masked",
    "round_overhead_flwr_plain": "fraction of a real `flwr run .` round in which no site "
    "ran DP-SGD, plain FedAvg (the quick start's simulated study)",
    "round_overhead_flwr_secagg": "round_overhead_flwr_plain with SecAgg+",
    "round_bytes": "bytes on the wire in one SecAgg+ round, all sites, both ways (the "
    "trainable subset)",
    "round_bytes_whole_unet": "round_bytes when every UNet tensor travels",
    "round_per_site_secagg_4_over_2": "a SecAgg+ round's seconds per site with 4 sites over with 2",
    "round_per_site_secagg_8_over_2": "a SecAgg+ round's seconds per site with 8 sites over with 2",
    "round_overhead_secagg_8_sites": "round_overhead_secagg with 8 sites (of the scaling studies)",
    "sampling_volumes_per_second": "volumes sampled per second: DDIM batches of "
    "sampling.batch-size, guided and decoded",
    "site_peak_memory_mb": "peak memory (MiB) of one site round in a process of its own "
    "(resident set on a CPU, allocated memory on CUDA)",
    "dp_step_width_2x_over_1x": "seconds of a DP-SGD step at 2x UNet width over 1x",
    "dp_step_width_4x_over_1x": "seconds of a DP-SGD step at 4x UNet width over 1x",
    "dp_step_64x64x16_over_default": "seconds of a DP-SGD step on 64x64x16 volumes' "
    "latents over the config's own",
    "site_peak_memory_width_2x_over_1x": "a site round's peak memory at 2x UNet width over 1x",
    "site_peak_memory_width_4x_over_1x": "a site round's peak memory at 4x UNet width over 1x",
    "site_peak_memory_64x64x16_over_default": "a site round's peak memory on 64x64x16 "
    "volumes' latents over the config's own",
}

NOT_A_KEY = "(not a current bench key)"
# what a bench output holds beside its keys' values
BENCH_FIELDS = {"figures", "hardware", "load_average", "settings", "date", "wall_seconds"}


@dataclass(frozen=True)
class Entry:
    """One key's figure in one file."""

    median: float
    repeats: int | None = None  # None: an old single value (repeats not recorded)
    q1: float | None = None
    q3: float | None = None
    low: float | None = None
    high: float | None = None
    method: str = ""
    again: bool = False  # measured again after the run (the file says why)


@dataclass
class Source:
    """One bench JSON file."""

    name: str
    date: str
    command: str
    machine: str
    hardware: dict
    settings: dict
    commit: str
    wall_seconds: float | None
    load: dict = field(default_factory=dict)  # load average at the start and the end
    entries: dict[str, Entry] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _entry(value: object, figure: dict | None) -> Entry:
    if figure is None:
        if not isinstance(value, int | float):
            raise FedsynthError(f"a bench value must be a number, got {value!r}")
        return Entry(float(value))
    return Entry(
        float(figure["median"]),
        int(figure["repeats"]),
        figure.get("q1"),
        figure.get("q3"),
        figure.get("min"),
        figure.get("max"),
        str(figure.get("method", "")),
    )


def load(path: Path) -> Source:
    """The file's figures and where they came from (either form, see the module)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FedsynthError(f"{path}: not a bench JSON file ({exc})") from exc
    results = data.get("results", data)
    figures = results.get("figures", {})
    source = Source(
        name=path.name,
        date=str(data.get("date") or results.get("date") or path.stem),
        command=str(data.get("command", "")),
        machine=str(data.get("machine", "")),
        hardware=results.get("hardware") or data.get("hardware") or {},
        settings=results.get("settings") or {},
        commit=str(data.get("commit", "")),
        wall_seconds=data.get("wall_seconds", results.get("wall_seconds")),
        load=results.get("load_average") or {},
    )
    if data.get("note"):
        source.notes.append(str(data["note"]))
    for key, value in results.items():
        if key not in BENCH_FIELDS:
            source.entries[key] = _entry(value, figures.get(key))
    for name, section in data.items():  # keys measured again, e.g. after a fix
        if isinstance(section, dict) and {"why", "results"} <= set(section):
            for key, value in section["results"].items():
                source.entries[key] = replace(_entry(value, None), again=True)
            keys = ", ".join(section["results"])
            source.notes.append(f"{keys}: measured again ({name}): {section['why']}")
    return source


def number(value: float) -> str:
    """A figure as the JSON has it: whole numbers with thousands separators."""
    if value.is_integer():
        return f"{int(value):,}"
    return f"{value:,}"


def spread(entry: Entry) -> str:
    """The quartiles and the range of a repeated figure; "—" for a single value."""
    if entry.repeats is None or entry.repeats < 2 or entry.q1 is None or entry.q3 is None:
        return "—"
    out = f"IQR {number(entry.q1)} to {number(entry.q3)}"
    if entry.low is not None and entry.high is not None:
        out += f", range {number(entry.low)} to {number(entry.high)}"
    return out


def hardware_line(source: Source) -> str:
    """What the file says it ran on: the recorded hardware, else the machine line."""
    hw = source.hardware
    if not hw:
        return source.machine or "not recorded"
    parts = [
        f"{hw.get('cpu', '?')}, {hw.get('cores', '?')} cores"
        + (
            f" ({hw['usable_cores']} usable)"
            if hw.get("usable_cores") not in (None, hw.get("cores"))
            else ""
        ),
        f"device {hw.get('device', '?')}",
        f"torch {hw.get('torch', '?')} on {hw.get('torch_threads', '?')} thread(s)",
        f"OMP_NUM_THREADS={hw.get('omp_num_threads')}",
        f"Python {hw.get('python', '?')}",
        str(hw.get("platform", "")),
    ]
    loads = [
        f"{' '.join(map(str, source.load[when]))} at the {when}"
        for when in ("start", "end")
        if source.load.get(when)
    ]
    if loads:
        parts.append(f"load average (1, 5, 15 min) {', '.join(loads)}")
    line = "; ".join(p for p in parts if p)
    return f"{line}; {source.machine}" if source.machine else line


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _link(source: Source) -> str:
    return f"[{source.name}](bench/{source.name})"


def _origin(source: Source, entry: Entry) -> str:
    again = ", measured again" if entry.again else ""
    return f"{_link(source)} ({source.date}{again})"


def render(sources: Sequence[Source]) -> str:
    """The Markdown page: the latest figure of every key, the sources, how each figure
    was measured, and earlier figures of keys measured more than once."""
    ordered = sorted(sources, key=lambda s: (s.date, s.name))
    latest: dict[str, tuple[Source, Entry]] = {}
    for source in ordered:
        for key, entry in source.entries.items():
            latest[key] = (source, entry)
    keys = [k for k in MEANINGS if k in latest] + sorted(k for k in latest if k not in MEANINGS)
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `{COMMAND}` from the bench runs in [docs/bench/](bench/): add or "
        "change a JSON file there and regenerate; do not edit this page by hand.",
        "",
        "Each key's row comes from the latest run (by date) that measured it. A value is "
        "the median of its repeats; the spread is their interquartile range and range. A "
        "ratio of two timings is the median of interleaved pairs (A B, B A, ... in one "
        "process after a warm-up: the ratio of each adjacent pair), so a machine whose "
        "load changes weighs on both sides alike; an overhead fraction's repeats are "
        "rounds; memory and bytes are measured once. Runs before 2026-12-06 recorded one "
        "value per key (repeats —): a single sample whose spread was not measured.",
        "",
        "| key | what it measures | value | spread | repeats | from |",
        "|---|---|---|---|---|---|",
    ]
    for key in keys:
        source, entry = latest[key]
        repeats = "—" if entry.repeats is None else str(entry.repeats)
        lines.append(
            f"| `{key}` | {_cell(MEANINGS.get(key, NOT_A_KEY))} | {number(entry.median)} "
            f"| {spread(entry)} | {repeats} | {_origin(source, entry)} |"
        )
    lines += ["", "## Runs", "", "| file | date | command | settings | hardware | commit |"]
    lines.append("|---|---|---|---|---|---|")
    for source in reversed(ordered):
        settings = ", ".join(f"{k} {v}" for k, v in source.settings.items() if v not in (None, []))
        command = f"`{source.command}`" if source.command else "—"
        lines.append(
            f"| {_link(source)} | {source.date} | {_cell(command)} | {_cell(settings or '—')} "
            f"| {_cell(hardware_line(source))} | {source.commit[:12] or '—'} |"
        )
    for source in reversed(ordered):
        methods = [(k, e.method) for k, e in source.entries.items() if e.method]
        if not methods and not source.notes:
            continue
        lines += ["", f"## How {source.name} measured", ""]
        lines += [f"- `{key}`: {method}" for key, method in methods]
        lines += [f"- {note}" for note in source.notes]
    earlier = [
        (key, source, source.entries[key])
        for key in keys
        for source in reversed(ordered)
        if key in source.entries and source is not latest[key][0]
    ]
    if earlier:
        lines += ["", "## Earlier figures", "", "| key | value | spread | repeats | from |"]
        lines.append("|---|---|---|---|---|")
        for key, source, entry in earlier:
            repeats = "—" if entry.repeats is None else str(entry.repeats)
            lines.append(
                f"| `{key}` | {number(entry.median)} | {spread(entry)} | {repeats} "
                f"| {_origin(source, entry)} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedsynth.simulations.bench_table",
        description="Print docs/benchmarks.md from bench JSON files (docs/bench/*.json).",
    )
    parser.add_argument("files", nargs="+", type=Path, metavar="JSON")
    args = parser.parse_args(argv)
    try:
        page = render([load(path) for path in args.files])
    except FedsynthError as exc:
        print(f"bench_table: error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
