"""The CLI's edge: every mistake a person makes on the command line is one line, naming
the argument, never a traceback or a silently different reading."""

from __future__ import annotations

import importlib.metadata
import json

import pytest

from fedsynth.common.cli import main
from fedsynth.common.config import ConfigError, load_config, parse_assignments
from fedsynth.common.errors import FedsynthError
from fedsynth.server.release import read_audits


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `fedsynth ARGV`, argparse's exits included."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    """The last stderr line, after checking there is no traceback."""
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_a_misspelt_option_is_named_before_the_required_one_it_hides(capsys):
    code, _, err = run(capsys, "phantoms", "--outt", "x")
    assert code == 2
    assert one_error_line(err) == "fedsynth phantoms: error: unrecognized arguments: --outt"
    # with nothing misspelt, the missing option is still what is reported
    code, _, err = run(capsys, "phantoms")
    assert one_error_line(err).endswith("the following arguments are required: --out")


def test_no_option_is_taken_for_a_longer_one_it_begins(capsys):
    """`--site 3` is not `--sites 3` (argparse's prefix matching is off), in subcommands
    and in nested ones."""
    code, _, err = run(capsys, "phantoms", "--out", "x", "--site", "3")
    assert code == 2 and "unrecognized arguments: --site 3" in one_error_line(err)
    code, _, err = run(capsys, "privacy", "verify", "--releas", "x")
    assert code == 2 and "unrecognized arguments: --releas" in one_error_line(err)


def test_version_is_the_installed_distributions(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0
    assert out.strip() == f"fedsynth {importlib.metadata.version('fedsynth')}"


def test_format_json_is_json(capsys):
    plan = ["privacy", "plan", "--epsilon", "3", "--delta", "1e-5"]
    plan += ["--sample-rate", "0.1", "--steps", "50"]
    code, out_format, _ = run(capsys, *plan, "--format", "json")
    code_json, out_json, _ = run(capsys, *plan, "--json")
    assert code == code_json == 0
    assert json.loads(out_format) == json.loads(out_json)
    _, out_text, _ = run(capsys, *plan, "--format", "text")
    with pytest.raises(json.JSONDecodeError):
        json.loads(out_text)


def test_an_output_path_that_is_a_file_names_the_option(capsys, tmp_path):
    taken = tmp_path / "a-file"
    taken.write_text("")
    code, _, err = run(capsys, "phantoms", "--out", str(taken), "--subjects", "2", "--quiet")
    assert code == 1
    line = one_error_line(err)
    assert line.startswith(f"fedsynth phantoms: error: --out {taken}: not a directory")


def test_an_output_folder_that_is_a_file_is_named(capsys, tmp_path):
    taken = tmp_path / "a-file"
    taken.write_text("")
    code, _, err = run(capsys, "study", "federation", "--out", str(taken))
    assert code == 1
    assert one_error_line(err) == (
        f"fedsynth study: error: --out {taken}: exists and is not a folder ({taken})"
    )


def test_an_output_path_whose_parent_cannot_be_made_names_the_option(capsys):
    out = "/proc/no-such-process/out"  # /proc refuses new folders, even to root
    code, _, err = run(capsys, "phantoms", "--out", out, "--subjects", "2", "--quiet")
    assert code == 1
    assert one_error_line(err).startswith(f"fedsynth phantoms: error: --out {out}: ")


def test_a_config_that_is_not_utf8_or_is_a_folder_is_one_line(capsys, tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("privacy:\n  note: r\xe9sum\xe9\n".encode("latin-1"))
    code, _, err = run(capsys, "config", "--config", str(latin1))
    assert code == 1
    assert one_error_line(err) == (
        f"fedsynth config: error: config {latin1.resolve()}: not UTF-8 text "
        "(byte 0xe9 at offset 18); save it as UTF-8"
    )
    code, _, err = run(capsys, "config", "--config", str(tmp_path))
    assert code == 1
    assert (
        one_error_line(err)
        == f"fedsynth config: error: config {tmp_path}: a folder, not a YAML file"
    )


@pytest.mark.parametrize(
    ("given", "read"),
    [
        ('"/tmp/run x"', "/tmp/run x"),
        ("'/tmp/run'", "/tmp/run"),
        ("/tmp/run", "/tmp/run"),
        ('"/tmp/run', '"/tmp/run'),  # one quote is part of the name, not quoting
    ],
)
def test_a_quoted_string_override_loses_its_quotes(given, read):
    config = load_config("default", parse_assignments([f"paths.run-dir={given}"]))
    assert config.paths.run_dir == read


def test_a_bad_quoted_override_is_refused():
    with pytest.raises(ConfigError, match=r"paths\.run-dir"):
        load_config("default", parse_assignments(['paths.run-dir="a"b"']))


def test_evaluate_names_a_bad_path_before_it_loads_a_model(capsys, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "manifest.csv").write_text("")
    code, _, err = run(capsys, "evaluate", "--real", str(tmp_path), "--synthetic", str(site))
    assert code == 1
    assert one_error_line(err) == (
        f"fedsynth evaluate: error: --real {tmp_path}: no manifest.csv (a site-style folder)"
    )
    code, _, err = run(capsys, "evaluate", "--real", str(site), "--synthetic", str(tmp_path))
    assert one_error_line(err).startswith(f"fedsynth evaluate: error: --synthetic {tmp_path}:")
    args = ["--real", str(site), "--synthetic", str(site), "--checkpoint", str(tmp_path)]
    code, _, err = run(capsys, "evaluate", *args)
    assert code == 1
    assert one_error_line(err).startswith(
        f"fedsynth evaluate: error: --checkpoint {tmp_path}: no feature_net.pt"
    )


def test_release_names_the_audit_file_it_could_not_read(tmp_path):
    missing = tmp_path / "site-1" / "audit.json"
    with pytest.raises(FedsynthError, match=rf"^--audit {missing}: no such file or directory$"):
        read_audits([f"site-1={missing}"])
    garbled = tmp_path / "audit.json"
    garbled.write_bytes(b"\xff\xfe{")
    with pytest.raises(FedsynthError, match=rf"^--audit {garbled}: not JSON$"):
        read_audits([str(garbled)])


def test_every_command_that_takes_json_takes_format_json():
    import argparse

    from fedsynth.common.cli import build_parser

    def leaves(parser: argparse.ArgumentParser, name: str):
        children = [
            (f"{name} {sub}", child)
            for action in parser._actions
            if isinstance(action, argparse._SubParsersAction)
            for sub, child in action.choices.items()
        ]
        if not children:
            yield name, parser
        for child_name, child in children:
            yield from leaves(child, child_name)

    with_json = {
        name: set(parser._option_string_actions)
        for name, parser in leaves(build_parser(), "fedsynth")
        if "--json" in parser._option_string_actions
    }
    assert len(with_json) >= 7  # site-check, privacy plan/verify, evaluate, audit, study, bench
    assert [name for name, options in with_json.items() if "--format" not in options] == []
